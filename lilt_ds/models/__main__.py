import sys

from ..config import ConfigError
from .summary import main

try:
    main()
except ConfigError as e:
    sys.exit(f"error: {e}")
