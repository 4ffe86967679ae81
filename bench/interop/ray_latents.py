"""Latents files between latentflow and the reference's Ray Data code, both ways.

  python3 ray_latents.py write OUT_DIR     # Ray/pyarrow write latents in every tensor layout
  python3 ray_latents.py read FILE ROWS    # the reference's loader reads a latentflow file

Rows: `hash` k, `caption` "caption k", `latents_16_bytes` [4, 2, 2] with values 100 k + i,
`caption_latents` [3, 2] with values k + i / 10. `tests/tests/latents_interop.rs` checks the
same values on the Rust side; the files `write` makes are in tests/fixtures/latents/.
"""
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def rows(n):
    latents = [np.arange(16, dtype=np.float32).reshape(4, 2, 2) + 100 * k for k in range(n)]
    captions = [(np.arange(6, dtype=np.float32) / 10 + k).reshape(3, 2) for k in range(n)]
    return latents, captions


def write(out):
    import ray
    from ray.data.context import DataContext

    n = 3
    latents, captions = rows(n)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    for version, v2 in (("ray_v1", False), ("ray_v2", True)):
        DataContext.get_current().use_arrow_tensor_v2 = v2
        items = [
            {"hash": k, "caption": f"caption {k}", "latents_16_bytes": latents[k], "caption_latents": captions[k]}
            for k in range(n)
        ]
        ds = ray.data.from_items(items).repartition(1)
        ds.write_parquet(f"{out}/{version}")
    # Arrow's canonical fixed-shape tensor, and a plain fixed-size list with latentflow's metadata.
    lat_type, cap_type = pa.fixed_shape_tensor(pa.float32(), [4, 2, 2]), pa.fixed_shape_tensor(pa.float32(), [3, 2])
    table = pa.table({
        "hash": pa.array(range(n), pa.int64()),
        "caption": [f"caption {k}" for k in range(n)],
        "latents_16_bytes": pa.ExtensionArray.from_storage(
            lat_type, pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([l.ravel() for l in latents])), 16)),
        "caption_latents": pa.ExtensionArray.from_storage(
            cap_type, pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([c.ravel() for c in captions])), 6)),
    })
    pq.write_table(table, f"{out}/fixed_shape_tensor.parquet")
    plain = pa.table({
        "hash": pa.array(range(n), pa.int64()),
        "caption": [f"caption {k}" for k in range(n)],
        "latents_16_bytes": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([l.ravel() for l in latents])), 16),
        "caption_latents": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate([c.ravel() for c in captions])), 6),
    }).replace_schema_metadata({
        "latentflow.latents_shape": "[4, 2, 2]",
        "latentflow.caption_latents_shape": "[3, 2]",
    })
    pq.write_table(plain, f"{out}/fixed_size_list.parquet")


def read(path, n):
    import ray

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    schema = pq.read_schema(path)
    for field in schema:
        print(field.name, field.type, field.metadata, file=sys.stderr)
    assert b"latentflow.latents_shape" in (schema.metadata or {}), schema.metadata
    # What the reference's training loader does.
    batch = ray.data.read_parquet(path).take_batch(n, batch_format="numpy")
    lat = batch["latents_16_bytes"].astype(np.float16)
    cap = batch["caption_latents"].astype(np.float16)
    latents, captions = rows(n)
    assert lat.shape == (n, 4, 2, 2), lat.shape
    assert cap.shape == (n, 3, 2), cap.shape
    order = np.argsort(batch["hash"])
    assert np.allclose(lat[order], np.stack(latents).astype(np.float16)), lat
    assert np.allclose(cap[order], np.stack(captions).astype(np.float16)), cap
    print(json.dumps({"rows": n, "latents": list(lat.shape), "caption_latents": list(cap.shape)}))


if __name__ == "__main__":
    if sys.argv[1] == "write":
        write(sys.argv[2])
    else:
        read(sys.argv[2], int(sys.argv[3]))
