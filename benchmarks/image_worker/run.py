"""Image worker throughput, DICOM files on disk to features stored.

    .venv/bin/python benchmarks/image_worker/run.py --images 256 [--device cuda] [--batch 64]

Writes ``--images`` 512 x 512 CT slices (uncompressed, 16-bit, random anatomy-like noise with
a stored window) into a fresh storage folder, indexes them through the ingest path, queues
them for the image stage, then runs ``ImageWorker`` until the queue is empty, timing:

* end to end: images/s from the first claim to the last committed feature row;
* decode only: ``file_to_image`` over the same files in a process pool of the same size;
* network only: ``extract_features`` on random input batches on the chosen device.

The slower of the last two is the bound; the report says which. Random weights are used
(the throughput does not depend on their values). Runs on the embedded PostgreSQL unless
``--database-url`` names an empty database.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.backbone import build_densenet121, extract_features, load_backbone  # noqa: E402
from pipelines.pixels import file_to_image  # noqa: E402
from service.database.engine import create_db_engine, migrate, start_embedded  # noqa: E402
from service.images.image_worker import ImageWorker, enqueue_missing  # noqa: E402


def make_ct_slice(rng: np.random.Generator, study: str, series: str, number: int):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientID, ds.PatientName, ds.Modality = "BENCH", "Bench^CT", "CT"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 512
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    yy, xx = np.mgrid[-256:256, -256:256]
    body = (xx ** 2 / 200 ** 2 + yy ** 2 / 150 ** 2) < 1
    pixels = np.where(body, 1064, 24) + rng.normal(0, 20, (512, 512))
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


def ingest_slices(engine, storage: Path, count: int) -> None:
    from io import BytesIO

    from pydicom.uid import generate_uid

    from service.ingest.ingestor import Ingestor
    from service.ingest.storage import FileStore

    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    with Ingestor(engine, FileStore(storage)) as ingestor:
        for number in range(count):
            buffer = BytesIO()
            make_ct_slice(rng, study, series, number + 1).save_as(buffer,
                                                                   enforce_file_format=True)
            assert ingestor.ingest(buffer.getvalue()).result == "stored"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--decode-workers", type=int, default=0)
    parser.add_argument("--database-url")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="default: what the service picks for the device")
    args = parser.parse_args()
    workers = args.decode_workers or len(os.sched_getaffinity(0))

    root = Path(tempfile.mkdtemp(prefix="image-bench-"))
    url = args.database_url or start_embedded(root / "pgdata")
    engine = create_db_engine(url)
    migrate(engine)
    ingest_slices(engine, root / "storage", args.images)
    enqueue_missing(engine)
    import torch

    weights = root / "weights.pth"
    torch.save(build_densenet121().state_dict(), weights)
    backbone = load_backbone(weights, device=args.device, precision=args.precision)
    print(f"{args.images} CT slices 512 x 512, batch {args.batch}, {workers} decode processes, "
          f"device {args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else os.cpu_count()} "
          f"{'' if args.device.startswith('cuda') else 'CPUs'}), torch threads "
          f"{torch.get_num_threads()}, precision {backbone.precision}")

    with ImageWorker(engine, backbone, storage_root=root / "storage",
                     feature_store=root / "features", name="bench", batch=args.batch,
                     decode_workers=workers) as worker:
        # warm the pool (imports) and the network outside the timed part
        files = sorted(str(p) for p in (root / "storage").rglob("*.dcm"))
        list(worker._pool.map(file_to_image, files[:workers]))
        extract_features(backbone, torch.zeros(2, 3, 224, 224))
        started = time.perf_counter()
        stop = threading.Event()
        runner = threading.Thread(target=worker.run, args=(stop,))
        runner.start()
        while worker.stats["done"] + worker.stats["skipped"] < args.images:
            time.sleep(0.05)
        end_to_end = time.perf_counter() - started
        stop.set()
        runner.join()

        files = sorted(str(p) for p in (root / "storage").rglob("*.dcm"))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(file_to_image, files[:workers]))  # imports in every process
            started = time.perf_counter()
            list(pool.map(file_to_image, files, chunksize=8))
        decode_only = time.perf_counter() - started

    batch = torch.randn(args.batch, 3, 224, 224)
    extract_features(backbone, batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    rounds = max(1, args.images // args.batch)
    for _ in range(rounds):
        extract_features(backbone, batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    network_only = (time.perf_counter() - started) / (rounds * args.batch) * args.images

    rate = args.images / end_to_end
    print(f"end to end: {rate:.1f} images/s ({end_to_end:.1f} s)")
    print(f"decode only: {args.images / decode_only:.1f} images/s; network only: "
          f"{args.images / network_only:.1f} images/s -> "
          f"{'decode' if decode_only > network_only else 'network'}-bound")
    engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
