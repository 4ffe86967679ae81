"""Pillow baseline for `bench/benches/data_path.rs`: the reference preprocessing on one core.

Reads the JPEGs in a folder and times, per image: decode (`Image.open(...).convert("RGB")`),
resize of the short side to RES (bilinear, antialiased), center crop, and to float [-1, 1] CHW
(what torchvision's `to_tensor` + `normalize(0.5, 0.5)` compute). Prints one JSON line.
"""
import json
import os
import sys
import time

import numpy as np
from PIL import Image

folder, res, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".jpg"))
blobs = [open(p, "rb").read() for p in paths]


def transform(blob):
    import io

    img = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = img.size
    if w <= h:
        size = (res, int(res * h / w))
    else:
        size = (int(res * w / h), res)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    left = int(round((size[0] - res) / 2.0))
    top = int(round((size[1] - res) / 2.0))
    img = img.crop((left, top, left + res, top + res))
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def decode(blob):
    import io

    return Image.open(io.BytesIO(blob)).convert("RGB")


results = {}
for name, fn in [("decode", decode), ("transform", transform)]:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for blob in blobs:
            fn(blob)
        best = min(best, time.perf_counter() - start)
    results[name] = len(blobs) / best
print(json.dumps({"images": len(blobs), "pillow_decode_per_s": results["decode"], "pillow_transform_per_s": results["transform"], "pillow": Image.__version__}))
