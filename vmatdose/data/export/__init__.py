"""Case-grid arrays -> files other tools read: :mod:`~vmatdose.data.export.rtdose` (DICOM RTDOSE)."""
