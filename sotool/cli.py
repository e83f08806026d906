"""The `sotool` command line: parses flags, calls the pipeline, prints. No logic here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from sotool import __version__
from sotool.errors import SotoolError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress neural networks with second-order information, from YAML recipes.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a recipe field: KEY=VALUE, e.g. gptq.bits=3"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON result on stdout")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show full tracebacks")]


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0] if lines else ""


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        raise e
    msg = _first_line(e) or type(e).__name__
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _guard(debug: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except SotoolError as e:
        _fail(e, debug)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: rerun the same command to resume[/]")
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        err.print(
            f"[bold red]error:[/] {type(e).__name__}: {_first_line(e)} "
            "(rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


@app.command()
def compress(
    recipe: RecipeArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="run directory [default: runs/<recipe name>]")
    ] = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    force: Annotated[bool, typer.Option("--force", help="rerun every stage")] = False,
    debug: DebugOpt = False,
) -> None:
    """Run a recipe: run, resume, or skip what is already done."""
    from sotool.pipeline import Runner, preflight
    from sotool.recipe import load_recipe
    from sotool.report import collect_run, totals_table

    def go() -> dict[str, Any]:
        loaded = load_recipe(recipe, set_ or [])
        preflight(loaded)
        run_dir = out or Path("runs") / recipe.stem
        result = Runner(loaded, run_dir, err).run(force=force)
        err.print(totals_table(collect_run(run_dir)))
        return result

    result = _guard(debug, go)
    if as_json:
        _emit(result)


@app.command()
def validate(
    recipe: RecipeArg, set_: SetOpt = None, as_json: JsonOpt = False, debug: DebugOpt = False
) -> None:
    """Check a recipe (shape, stage params, model and data paths) without running it."""
    from sotool.pipeline import preflight
    from sotool.recipe import load_recipe

    def go() -> dict[str, Any]:
        loaded = load_recipe(recipe, set_ or [])
        preflight(loaded)
        return loaded.resolved()

    resolved = _guard(debug, go)
    err.print(
        f"[green]ok[/]: {recipe} ({len(resolved['stages'])} stages: "
        f"{', '.join(next(iter(s)) for s in resolved['stages'])})"
    )
    if as_json:
        _emit(resolved)


@app.command()
def stages(as_json: JsonOpt = False) -> None:
    """List every stage with its params, defaults and help."""
    from pydantic_core import PydanticUndefined

    from sotool.registry import known_stages

    data = {}
    for name, spec in known_stages().items():
        fields = {}
        for fname, f in spec.params.model_fields.items():
            if f.default is not PydanticUndefined:
                default = f.default
            elif f.default_factory is not None:
                default = f.default_factory()
            else:
                default = "(required)"
            fields[fname] = {
                "type": _type_name(f.annotation),
                "default": default,
                "help": f.description or "",
            }
        data[name] = {"help": spec.help, "version": spec.version, "params": fields}
    if as_json:
        _emit(data)
        return
    con = Console(stderr=False)
    for name, d in data.items():
        t = Table(
            title=f"[bold]{name}[/]: {d['help']}",
            title_justify="left",
            header_style="bold",
            show_edge=False,
        )
        t.add_column("param")
        t.add_column("type")
        t.add_column("default")
        t.add_column("help")
        for fname, f in d["params"].items():
            t.add_row(fname, f["type"], json.dumps(f["default"], default=str), f["help"])
        if not d["params"]:
            t.add_row("-", "", "", "(no params)")
        con.print(t)
        con.print()


def _type_name(ann: Any) -> str:
    s = getattr(ann, "__name__", None) if not getattr(ann, "__args__", None) else None
    return s or str(ann).replace("typing.", "")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="run directory")],
    sort: Annotated[
        str,
        typer.Option(
            help="column to sort layers by (gptq_loss, rtn_loss, ratio, h_trace, seconds, "
            "layer; sensitivity: trace, eigen, fisher, layerwise)"
        ),
    ] = "gptq_loss",
    top: Annotated[int | None, typer.Option(help="show only the first N layers")] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="also write the frontier and per-layer sensitivity to this PNG"),
    ] = None,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-layer tables (sensitivity, allocation, frontier) and stage results of a run."""
    from sotool.report import collect_run, mixed_data, plot_mixed, print_report

    if as_json:
        _emit(_guard(debug, lambda: {**collect_run(run_dir), **mixed_data(run_dir)}))
    else:
        _guard(debug, print_report, run_dir, Console(stderr=False), sort, top)
    if plot is not None:
        _guard(debug, plot_mixed, mixed_data(run_dir), plot)
        err.print(f"wrote {plot}")


@app.command()
def inspect(
    model_dir: Annotated[Path, typer.Argument(help="exported model directory")],
    zeros: Annotated[
        bool, typer.Option(help="count zero weights (reads every tensor; --no-zeros: headers only)")
    ] = True,
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-layer bits, group size, sparsity and size of an exported model (any tool's)."""
    from sotool.inspect import inspect_dir
    from sotool.report import inspect_table

    res = _guard(debug, inspect_dir, model_dir, zeros)
    if as_json:
        _emit(res)
        return
    err.print(inspect_table(res))


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(help="model (HF id, dir, .gguf, demo name) or run dir")],
    data: Annotated[str, typer.Option(help="text source: file, .jsonl, hf:NAME, pydoc")] = "pydoc",
    windows: Annotated[int, typer.Option(help="number of windows")] = 40,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    span: Annotated[str, typer.Option(help="start,end fractions of the token stream")] = "0,1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda")] = "auto",
    as_json: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Perplexity of any model or run on held-out text."""
    from sotool.pipeline import evaluate_target

    def go() -> dict[str, Any]:
        try:
            a, b = (float(x) for x in span.split(","))
        except ValueError as e:
            raise SotoolError(f"--span {span!r}: expected START,END fractions, e.g. 0.9,1") from e
        return evaluate_target(
            target,
            data=data,
            windows=windows,
            seqlen=seqlen,
            span=(a, b),
            device=device,
            console=err,
        )

    res = _guard(debug, go)
    err.print(f"perplexity {res['ppl']:.4f} on {res['windows']} windows × {seqlen} tokens")
    if as_json:
        _emit(res)


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="print the version")] = False,
) -> None:
    if version:
        print(__version__)
        raise typer.Exit(0)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    app()


if __name__ == "__main__":
    main()
