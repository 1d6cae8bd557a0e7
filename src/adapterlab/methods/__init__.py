"""One file per method; importing this package registers them all."""
from . import lora  # noqa: F401
from . import hft  # noqa: F401
from . import locft  # noqa: F401
from . import levi  # noqa: F401
from . import sft  # noqa: F401
from . import sara  # noqa: F401
