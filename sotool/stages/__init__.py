"""Built-in stages; importing this package registers them."""

from sotool.stages import (  # noqa: F401
    calibrate,
    evaluate,
    export,
    fisher,
    gptq,
    hessians,
    prune,
    rtn,
    search,
    sensitivity,
)
