"""img2dataset's per-image stages, timed from outside with its own functions (run by img2dataset's venv).

Run by ``benchmarks/sharder_stages.py``; imports nothing of Flora (img2dataset's pins clash with it).

    python img2dataset_stages.py stages URLS N OUT_DIR RESULT_JSON SETTINGS_JSON
    python img2dataset_stages.py total URLS OUT_DIR SETTINGS_JSON THREADS

``stages``: one thread, each URL through the steps of img2dataset's ``Downloader.download_shard`` in
order, each timed with the thread's CPU clock: ``download_image`` (urllib, as with its retries when the
first try works), the ``Resizer`` call (split into ``cv2.imdecode``, albumentations ``SmallestMaxSize``
and ``cv2.imencode`` timed again on the same bytes; the rest of the call is "other image work"), EXIF
(``exifread``, its default) and SHA-256 (its default ``compute_hash``), ``WebDatasetSampleWriter.write``
(tar + parquet). Writes ms per image. ``total``: the img2dataset command itself, one process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import


def stages(urls: str, n: str, out_dir: str, result: str, settings: str) -> None:
    import albumentations as A
    import cv2
    import exifread
    import numpy as np
    import pyarrow as pa
    from img2dataset.downloader import download_image
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    cfg = json.loads(settings)
    cv2.setNumThreads(1)
    resizer = Resizer(cfg["image_size"], "keep_ratio", True, encode_quality=cfg["quality"])
    shrink = A.SmallestMaxSize(max_size=cfg["image_size"], interpolation=cv2.INTER_AREA, p=1.0)
    params = [int(cv2.IMWRITE_JPEG_QUALITY), cfg["quality"]]
    schema = pa.schema(
        [
            pa.field(k, t)
            for k, t in (
                ("url", pa.string()),
                ("key", pa.string()),
                ("status", pa.string()),
                ("error_message", pa.string()),
                ("width", pa.int32()),
                ("height", pa.int32()),
                ("original_width", pa.int32()),
                ("original_height", pa.int32()),
                ("exif", pa.string()),
                ("sha256", pa.string()),
            )
        ]
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    writer = WebDatasetSampleWriter(0, out_dir, False, 5, schema, "jpg")
    spent = dict.fromkeys(("http", "decode", "resize", "encode", "other image work", "exif", "hashing"), 0)
    spent["tar write"] = 0
    done = 0
    for i, url in enumerate(Path(urls).read_text().split()[: int(n)]):
        t0 = time.thread_time_ns()
        _, stream, error = download_image((i, url), 10, None, None)
        t1 = time.thread_time_ns()
        spent["http"] += t1 - t0
        if stream is None:
            continue
        img, width, height, ow, oh, error = resizer(stream)
        t2 = time.thread_time_ns()
        if error is not None:
            continue
        # the resizer's steps again on the same bytes, each timed: what they cost inside the call above
        buf = np.frombuffer(stream.getvalue(), np.uint8)
        t3 = time.thread_time_ns()
        decoded = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
        t4 = time.thread_time_ns()
        small = shrink(image=decoded)["image"] if min(decoded.shape[:2]) > cfg["image_size"] else decoded
        t5 = time.thread_time_ns()
        cv2.imencode(".jpg", small, params=params)
        t6 = time.thread_time_ns()
        parts = {"decode": t4 - t3, "resize": t5 - t4, "encode": t6 - t5}
        for k, v in parts.items():
            spent[k] += v
        spent["other image work"] += max(0, (t2 - t1) - sum(parts.values()))
        t7 = time.thread_time_ns()
        stream.seek(0)
        exif = json.dumps(
            {k: str(v).strip() for k, v in exifread.process_file(stream, details=False).items()}
        )
        t8 = time.thread_time_ns()
        stream.seek(0)
        digest = hashlib.sha256(stream.read()).hexdigest()
        t9 = time.thread_time_ns()
        meta = {
            "url": url,
            "key": f"{i:09d}",
            "status": "success",
            "error_message": None,
            "width": width,
            "height": height,
            "original_width": ow,
            "original_height": oh,
            "exif": exif,
            "sha256": digest,
        }
        writer.write(img, meta["key"], None, meta)
        t10 = time.thread_time_ns()
        spent["exif"] += t8 - t7
        spent["hashing"] += t9 - t8
        spent["tar write"] += t10 - t9
        done += 1
    t0 = time.thread_time_ns()
    writer.close()
    spent["tar write"] += time.thread_time_ns() - t0
    out = {k: v / max(done, 1) / 1e6 for k, v in spent.items()}
    out["images"] = done
    Path(result).write_text(json.dumps(out))


def total(urls: str, out_dir: str, settings: str, threads: str) -> None:
    cfg = json.loads(settings)
    exe = Path(sys.executable).with_name("img2dataset")
    argv = [
        str(exe),
        "--url_list",
        urls,
        "--input_format",
        "txt",
        "--output_format",
        "webdataset",
        "--output_folder",
        out_dir,
        "--processes_count",
        "1",
        "--thread_count",
        threads,
        "--image_size",
        str(cfg["image_size"]),
        "--resize_mode",
        "keep_ratio",
        "--resize_only_if_bigger",
        "True",
        "--encode_quality",
        str(cfg["quality"]),
        "--retries",
        str(cfg["retries"]),
        "--timeout",
        "10",
        "--number_sample_per_shard",
        str(cfg["shard_samples"]),
        "--distributor",
        "multiprocessing",
        "--enable_wandb",
        "False",
    ]
    subprocess.run(argv, check=True, capture_output=True)


if __name__ == "__main__":
    {"stages": stages, "total": total}[sys.argv[1]](*sys.argv[2:])
