"""What a user of a registered model meets: the fused pipeline (paper Algorithm 1 as an MLflow pyfunc)
and ``vbiopsy predict`` on one patient's DICOM study."""
