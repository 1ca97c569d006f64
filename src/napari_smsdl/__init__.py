"""napari-smsdl: H&E-guided super-resolution of mass spectrometry images.

The package root imports nothing heavy (no Qt, torch or SimpleITK) so that readers, the CLI and
the sample data stay cheap to import. Widgets live in :mod:`napari_smsdl.widgets`.
"""

__version__ = "0.1.0"

from .errors import Cancelled, ImzMLError, InputError, RegistrationError, SmsdlError

__all__ = ["Cancelled", "ImzMLError", "InputError", "RegistrationError", "SmsdlError", "__version__"]
