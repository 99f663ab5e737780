"""Raw data -> case files.

* :mod:`~vmatdose.data.ingest.dicom`: one DICOM-RT patient folder -> :class:`Case`
  (with :mod:`dicom_files`, :mod:`dicom_ct`, :mod:`dicom_struct`, :mod:`dicom_dose`,
  :mod:`dicom_plan`, :mod:`rasterize` and :mod:`structure_names`);
* :mod:`~vmatdose.data.ingest.openkbp`: one OpenKBP patient folder -> :class:`Case`;
* :mod:`~vmatdose.data.ingest.batch`: many jobs -> case files, in parallel, resumable.

Submodules are imported on use (pydicom and SimpleITK load only for DICOM).
"""
