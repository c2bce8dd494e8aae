"""virtual-biopsy: multimodal breast-cancer virtual biopsy (FFDM + CESM) with CESM imputation.

Layers (lower never imports higher):
1. config, metrics, dicom            2. data, models (networks only)
3. training, fusion, evaluation      4. tracking, registry, pipeline
5. stages (one per DVC stage), cli
"""
__version__ = "0.1.0"
