"""PixArt-δ models: LCM scheduler, pipeline loading and rendering, the tiny offline model. No Celery, SQL or boto3."""

import logging

# bitsandbytes warns at import that an optional 4-bit CPU kernel package is missing; the farm uses no 4-bit path.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
