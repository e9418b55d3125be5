"""medledger: secure health-information storage on a hybrid blockchain."""

from medledger.core.errors import MedledgerError

__all__ = ["MedledgerError", "__version__"]
__version__ = "0.1.0"
