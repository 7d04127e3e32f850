"""Synthetic CT cohorts for OOD-detection experiments: procedural chest-CT phantoms and the MNI152 template.

Cohorts (``cohort=`` of :func:`make_chest_ct` and :func:`write_cohort`):

``"id"``
    Challenge-like chest CTs (0.7-0.9 mm in-plane, 1-5 mm slices) with COVID-19-like ground-glass
    opacities and consolidations (label 1).
``"dataset-shift"``
    The same disease imaged differently: 8 mm slices, a sharp or a soft kernel with another noise
    level, smaller or larger patients.
``"diagnostic-shift"``
    Other lung findings: basal fibrotic reticulation, solid nodules, pleural effusion (label 1).
``"far-ood"``
    An abdomen without lungs (empty label). :func:`load_mni152_t1` adds a real brain MR template.

Arrays are numpy ``(z, y, x)``; spacing/origin/direction follow SimpleITK ``(x, y, z)``. Importing this
package needs numpy and SimpleITK only.
"""

from segsentry.phantoms.chest import COHORTS, make_chest_ct
from segsentry.phantoms.cohort import FILE_ENDINGS, case_seed, write_cohort
from segsentry.phantoms.filters import convolve1d, gaussian_blur, gaussian_kernel1d
from segsentry.phantoms.mni import load_mni152_t1, mni152_t1_path, ras_affine_to_lps
from segsentry.phantoms.phantom import IDENTITY_DIRECTION, Phantom

__all__ = [
    "COHORTS",
    "FILE_ENDINGS",
    "IDENTITY_DIRECTION",
    "Phantom",
    "case_seed",
    "convolve1d",
    "gaussian_blur",
    "gaussian_kernel1d",
    "load_mni152_t1",
    "make_chest_ct",
    "mni152_t1_path",
    "ras_affine_to_lps",
    "write_cohort",
]
