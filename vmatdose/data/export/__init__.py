"""Case-grid arrays -> files other tools read: :mod:`~vmatdose.data.export.rtdose` (DICOM RTDOSE),
:mod:`~vmatdose.data.export.openkbp` (OpenKBP challenge submissions)."""
