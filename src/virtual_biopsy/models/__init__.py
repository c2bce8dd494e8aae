"""Networks only (no I/O, no MLflow): CycleGAN generator/discriminator and the CNN classifiers."""
from virtual_biopsy.models.classifiers import (
    ARCHITECTURES,
    MALIGNANT_CLASS,
    N_CLASSES,
    WeightsFileError,
    build_classifier,
    load_classifier_weights,
)
from virtual_biopsy.models.cyclegan import PatchDiscriminator, ResnetGenerator, init_cyclegan_weights

__all__ = [
    "ARCHITECTURES",
    "MALIGNANT_CLASS",
    "N_CLASSES",
    "PatchDiscriminator",
    "ResnetGenerator",
    "WeightsFileError",
    "build_classifier",
    "init_cyclegan_weights",
    "load_classifier_weights",
]
