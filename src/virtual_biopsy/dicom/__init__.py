"""Layer 1: DICOM reading (pixels in presentation space), writing, CESM energy marks, synthetic-CESM objects."""
