"""hf_eenet: budgeted early-exit inference for Hugging Face classifiers with a learned exit scheduler (EENet).

Importing the package registers its configs and models with the transformers Auto classes.
"""

from .cpu import tune_cpu_allocator
from .models import *  # noqa: F403
from .models import EENET_VERSION as __version__
from .models import __all__ as _models_all
from .pipelines import EENetImageClassificationPipeline, EENetTextClassificationPipeline
from .registration import register

register()

__all__ = [
    "__version__",
    "register",
    "EENetImageClassificationPipeline",
    "EENetTextClassificationPipeline",
    "tune_cpu_allocator",
    *_models_all,
]
