"""Cost of the reading checks (segsentry.runtime.validate.check_file: header vs payload, compressed stream decoded
end to end, raw float values) beside SimpleITK's own read, on one 512 x 512 x 300 CT-sized volume per format.

    python benchmarks/input_checks.py [benchmarks/results/input_checks.json]
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from segsentry.runtime.validate import check_file

SHAPE = (300, 512, 512)  # z, y, x


def main(out: Path) -> None:
    ct = np.random.default_rng(0).normal(0, 300, SHAPE).astype(np.int16)  # noise: compresses like a worst case
    cases = [("ct_int16.nii.gz", ct, True), ("ct_int16.nii", ct, False), ("ct_float32.nii.gz", ct.astype(np.float32), True),
             ("ct_float32.mha", ct.astype(np.float32), True), ("ct_int16.nrrd", ct, True)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, array, compress in cases:
            path = Path(tmp) / name
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((0.7, 0.7, 1.0))
            sitk.WriteImage(image, str(path), compress)
            check, read = [], []
            for _ in range(2):
                t0 = time.perf_counter()
                check_file(path)
                check.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                sitk.ReadImage(str(path))
                read.append(time.perf_counter() - t0)
            results.append({"file": name, "shape_zyx": list(SHAPE), "bytes_on_disk": path.stat().st_size,
                            "check_file_s": round(min(check), 3), "sitk_read_s": round(min(read), 3)})
            print(results[-1], flush=True)
            path.unlink()
    out.write_text(json.dumps({
        "what": "check_file vs SimpleITK ReadImage, best of 2 (file in the page cache)",
        "machine": f"{platform.machine()}, 2 cores shared with other jobs",
        "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / "input_checks.json")
