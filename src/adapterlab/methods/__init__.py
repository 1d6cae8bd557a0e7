"""One file per method; importing this package registers them all."""

from . import (
    hft,  # noqa: F401
    levi,  # noqa: F401
    locft,  # noqa: F401
    lora,  # noqa: F401
    sara,  # noqa: F401
    sft,  # noqa: F401
)
