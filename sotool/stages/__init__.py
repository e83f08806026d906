"""Built-in stages; importing this package registers them."""

from sotool.stages import calibrate, evaluate, export, gptq, hessians, prune, rtn  # noqa: F401
