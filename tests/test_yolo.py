"""YOLOv5 / YOLOv8 / YOLO11 (and -seg) variants with attention convs through
attnconv.integrations.ultralytics: placement, parameters and multiply-adds next to the plain
model, and end to end through ultralytics itself (train one epoch, validate, export to ONNX and
run it with onnxruntime). Nothing is downloaded: models come from YAML and the network is
blocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

# ultralytics reads these when it is first imported: settings go to a throw-away folder, and it
# must never go online (weights, fonts, datasets, telemetry).
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="attnconv-yolo-"))
os.environ["YOLO_OFFLINE"] = "1"
pytest.importorskip("ultralytics", reason="the attnconv[yolo] extra is not installed "
                    "(pip install 'attnconv[yolo]'; `make test` installs it via the dev extra)")

from ultralytics import YOLO
from ultralytics.nn.modules.block import Bottleneck
from ultralytics.nn.modules.conv import Conv
from ultralytics.utils import SETTINGS, YAML

from attnconv.analysis.profiling import count_macs, count_params
from attnconv.detection import make_shapes_dataset
from attnconv.engine.tables import markdown_table
from attnconv.integrations.ultralytics import (
    BLOCKS,
    complexity,
    register,
    variant_yaml,
    variants,
    write_yolo_dataset,
)
from attnconv.layers import create_conv

SETTINGS.update(sync=False)
register()

SUFFIXES = {"rfa": "RFAConv", "rfcbam": "RFCBAMConv", "rfca": "RFCAConv", "aw": "AWConv"}
#: Layer indices read off ultralytics' YAMLs by hand: the stride-2 3x3 convs after the stem
#: (backbone 1, 3, 5, 7 and the two PAN downsamplings), and the CSP rows.
DOWNSAMPLING = {"yolov5": (1, 3, 5, 7, 18, 21), "yolov8": (1, 3, 5, 7, 16, 19),
                "yolo11": (1, 3, 5, 7, 17, 20)}
CSP = {"yolov5": ("c3", (2, 4, 6, 8, 13, 17, 20, 23)),
       "yolov8": ("c2f", (2, 4, 6, 8, 12, 15, 18, 21)),
       "yolo11": ("c3k2", (2, 4, 6, 8, 13, 16, 19, 22))}


@pytest.fixture
def no_network(monkeypatch):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise OSError("network blocked in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


def test_variant_names_and_refusals():
    names = variants()
    # 3 families x 2 placements x 4 convs, plus the -seg heads of v8 and 11.
    assert len(names) == len(set(names)) == 3 * 2 * 4 + 2 * 2 * 4
    assert {"yolov5n-rfa", "yolov8n-c2f-aw", "yolo11n-c3k2-rfca", "yolo11n-seg-rfcbam",
            "yolov8n-seg-c2f-rfa"} <= set(names)
    assert all(n.startswith(("yolov5s", "yolov8s", "yolo11s")) for n in variants("s"))
    for bad in ("yolov8n-nope", "yolov9n-rfa", "yolov8q-rfa", "yolov5n-seg-rfa",
                "yolo11n-c2f-rfa", "yolov8n-c3k2-rfa", "yolo11n-rfa-c3k2", "yolov8n-seg"):
        with pytest.raises(ValueError, match="unknown YOLO variant"):
            variant_yaml(bad)


@pytest.mark.parametrize(("family", "seg"), [("yolov5", ""), ("yolov8", ""), ("yolo11", ""),
                                           ("yolov8", "-seg"), ("yolo11", "-seg")])
def test_yaml_is_ultralytics_own_with_rows_renamed(family, seg, tmp_path):
    import ultralytics

    folder = {"yolov5": "v5", "yolov8": "v8", "yolo11": "11"}[family]
    own = YAML.load(Path(ultralytics.__file__).parent / "cfg/models" / folder /
                    f"{family}{seg}.yaml")
    own_rows = own["backbone"] + own["head"]
    path = variant_yaml(f"{family}s{seg}-rfca", tmp_path)
    assert path == tmp_path / f"{family}s{seg}-rfca.yaml"  # the scale is read from the name
    rows = YAML.load(path)["backbone"] + YAML.load(path)["head"]
    assert [i for i, row in enumerate(rows) if row[2] == "RFCAConv"] == list(DOWNSAMPLING[family])
    csp, csp_rows = CSP[family]
    rows = YAML.load(variant_yaml(f"{family}n{seg}-{csp}-aw", tmp_path))
    rows = rows["backbone"] + rows["head"]
    assert [i for i, row in enumerate(rows) if row[2].endswith("_AWConv")] == list(csp_rows)
    # Everything else is the installed YAML, unchanged.
    for i, (row, base) in enumerate(zip(rows, own_rows, strict=True)):
        assert row[:2] + row[3:] == base[:2] + base[3:], i
        assert row[2] == (f"{base[2]}_AWConv" if i in csp_rows else base[2])


def _extra_params(plain_convs: list[torch.nn.Conv2d], conv_name: str, stride: int) -> int:
    """What the attention convs add over the plain convs they replace."""
    extra = 0
    for conv in plain_convs:
        attn = create_conv(conv_name, conv.in_channels, conv.out_channels, 3, stride, padding=1,
                           bias=False)
        extra += count_params(attn) - count_params(conv)
    return extra



@pytest.mark.parametrize("name", ["yolov5n-rfa", "yolo11n-aw", "yolov8n-seg-rfcbam",
                                  "yolo11n-seg-rfca"])
def test_downsampling_variants_build(name, one_thread, no_network):
    family = name.split("-")[0][:-1]
    block = SUFFIXES[name.rsplit("-", 1)[1]]
    plain = YOLO(f"{name.rsplit('-', 1)[0]}.yaml").model.eval()  # ultralytics' own, no weights
    model = YOLO(variant_yaml(name)).model.eval()
    assert [i for i, m in enumerate(model.model) if type(m).__name__ == block] == \
        list(DOWNSAMPLING[family])
    assert type(model.model[0]) is Conv  # the stem stays plain
    for i in DOWNSAMPLING[family]:
        conv, base = model.model[i].conv, plain.model[i].conv
        assert (conv.in_channels, conv.out_channels, conv.stride, conv.padding) == \
            (base.in_channels, base.out_channels, base.stride, base.padding)
        assert model.model[i].act is not None and type(model.model[i].act) is type(
            plain.model[i].act)
    extra = _extra_params([plain.model[i].conv for i in DOWNSAMPLING[family]],
                          BLOCKS[block].conv_name, 2)
    assert count_params(model) - count_params(plain) == extra > 0
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64))
        ref = plain(torch.rand(2, 3, 64, 64))
    shape = out[0].shape if "seg" not in name else out[0][0].shape
    assert shape == (ref[0].shape if "seg" not in name else ref[0][0].shape)
    assert no_network == []


@pytest.mark.parametrize("name", ["yolo11n-c3k2-rfa", "yolov8n-c2f-rfca", "yolov5n-c3-aw",
                                  "yolo11n-seg-c3k2-rfcbam", "yolo11m-c3k2-rfa"])
def test_csp_variants_put_the_layer_in_every_bottleneck(name, one_thread, no_network):
    family = name.split("-")[0][:-1]
    block = BLOCKS[SUFFIXES[name.rsplit("-", 1)[1]]]
    plain_name = name.replace(f"-{CSP[family][0]}", "").rsplit("-", 1)[0]
    plain = YOLO(f"{plain_name}.yaml").model.eval()
    model = YOLO(variant_yaml(name)).model.eval()
    replaced, plain_convs = 0, []
    for i, (layer, base) in enumerate(zip(model.model, plain.model, strict=True)):
        bottlenecks = [m for m in layer.modules() if isinstance(m, Bottleneck)]
        if i in CSP[family][1]:
            assert bottlenecks
            plain_convs += [m.cv2.conv for m in base.modules() if isinstance(m, Bottleneck)]
        for b in bottlenecks:
            assert type(b.cv1) is Conv  # only the second conv carries the layer
            assert type(b.cv2) is (block if i in CSP[family][1] else Conv)
            replaced += type(b.cv2) is block
        if i not in CSP[family][1]:
            assert not any(isinstance(m, block) for m in layer.modules())
    # yolo11m's deep C3k2 rows (c3k=True) nest C3k blocks: their bottlenecks count too.
    assert replaced == len(plain_convs) >= 8
    assert count_params(model) - count_params(plain) == _extra_params(
        plain_convs, block.conv_name, 1)
    with torch.no_grad():
        model(torch.rand(1, 3, 64, 64))


def test_counts_against_ultralytics_summaries(one_thread, no_network):
    rows = complexity(["yolov8n", "yolov8n-rfa", "yolo11n", "yolo11n-rfa", "yolov5n"])
    table = {name: (params, macs) for name, params, macs in rows}
    # ultralytics' own summaries: YOLOv8n 3,157,200 parameters, 8.7 GFLOPs; YOLO11n 2,624,080,
    # 6.6 GFLOPs (GFLOPs = 2 x multiply-adds; ultralytics rounds its own estimate).
    assert table["yolov8n"][0] == 3_157_200 and 4.3e9 < table["yolov8n"][1] < 4.4e9
    assert table["yolo11n"][0] == 2_624_080 and 3.2e9 < table["yolo11n"][1] < 3.35e9
    for plain in ("yolov8n", "yolo11n"):
        assert table[f"{plain}-rfa"][0] > table[plain][0]
        assert table[f"{plain}-rfa"][1] > table[plain][1]
    model = YOLO("yolov5n.yaml").model.eval()
    assert table["yolov5n"] == (count_params(model),
                                count_macs(model, torch.zeros(1, 3, 640, 640)))
    print("\n" + markdown_table(("model (640x640)", "params (M)", "MACs (G)"),
                                [(n, p / 1e6, m / 1e9) for n, p, m in rows]))




def test_polygon_labels_trace_the_generated_masks(tmp_path):
    import cv2
    from PIL import Image

    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=3, num_val=1, image_size=64,
                                 masks=True)
    data = write_yolo_dataset(shapes, tmp_path / "yolo", segments=True)
    assert YAML.load(data)["names"] == ["rectangle", "ellipse", "triangle"]
    for label in sorted((tmp_path / "yolo" / "labels" / "train").iterdir()):
        mask = np.asarray(Image.open(shapes.root / "masks" / "train" / f"{label.stem}.png"))
        drawn = np.zeros_like(mask)
        for line in label.read_text().split("\n"):
            if not line:
                continue
            cls, *coords = line.split()
            xy = np.array(coords, float).reshape(-1, 2) * 64
            assert len(xy) >= 3 and (xy >= 0).all() and (xy <= 64).all()
            cv2.fillPoly(drawn, [np.round(xy).astype(np.int32)], int(cls) + 1)
        # Each polygon is its object's outline with the right class: the redrawn label map
        # agrees with the mask except on the outline pixels.
        assert (drawn == mask).mean() > 0.97
        assert set(np.unique(drawn)) == set(np.unique(mask))
    with pytest.raises(FileNotFoundError, match="masks=True"):
        write_yolo_dataset(make_shapes_dataset(tmp_path / "plain", num_train=1, num_val=1,
                                               image_size=32), tmp_path / "y2", segments=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["yolo11n-rfa", "yolo11n-seg-c3k2-rfcbam"])
def test_train_validate_export_through_ultralytics(name, tmp_path, no_network, one_thread,
                                                   monkeypatch):
    """One epoch on generated data, ultralytics' validation, model.export(format='onnx'), and
    the ONNX model run by onnxruntime against PyTorch."""
    import onnxruntime as ort
    import ultralytics.data.utils

    # Fonts are only for plots (disabled here); the dataset check fetches one anyway.
    monkeypatch.setattr(ultralytics.data.utils, "check_font", lambda *a, **k: None)
    seg = "-seg" in name
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=4, num_val=2, image_size=64,
                                 masks=seg)
    data = write_yolo_dataset(shapes, tmp_path / "yolo", segments=seg)
    block = SUFFIXES[name.rsplit("-", 1)[1]]
    yolo = YOLO(variant_yaml(name))
    assert yolo.task == ("segment" if seg else "detect")
    start = {}

    def snapshot(trainer):
        start.update({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})

    yolo.add_callback("on_train_start", snapshot)
    yolo.train(data=str(data), epochs=1, imgsz=64, batch=2, workers=0, device="cpu",
               plots=False, amp=False, project=str(tmp_path / "runs"), name=name,
               exist_ok=True, verbose=False, seed=0, deterministic=False)
    weights = tmp_path / "runs" / name / "weights" / "best.pt"
    assert weights.is_file()
    trained = yolo.trainer.model
    attn = [n for n, m in trained.named_modules() if type(m).__name__ == block]
    assert attn
    # The attention's own parameters (not only the conv weight) were trained.
    changed = [k for k, v in trained.state_dict().items()
               if k.startswith(tuple(f"{n}.conv." for n in attn)) and not k.endswith(".weight")
               and v.is_floating_point() and not torch.equal(v, start[k])]
    assert changed

    model = YOLO(str(weights))
    metrics = model.val(data=str(data), imgsz=64, batch=2, workers=0, device="cpu",
                        plots=False, verbose=False)
    assert 0.0 <= metrics.box.map <= 1.0
    if seg:
        assert 0.0 <= metrics.seg.map <= 1.0

    onnx_file = model.export(format="onnx", imgsz=64, simplify=False, device="cpu")
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 64, 64)
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    reference = YOLO(str(weights)).model.float().eval()
    with torch.no_grad():
        # In eval mode the first output is what the exported graph computes: the decoded
        # predictions, and for -seg the mask prototypes beside them.
        expected = reference(x)[0]
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(outputs) == (2 if seg else 1)
    for out in outputs:
        ref = next(t.numpy() for t in expected if tuple(t.shape) == out.shape)
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * max(scale, 1.0))
    assert no_network == []


#: Run in a new process that never imports attnconv itself: loading the saved model must.
_REBUILD_SAVED = """
import sys
from ultralytics import YOLO
from ultralytics.nn.tasks import DetectionModel

saved = YOLO(sys.argv[1])
# What YOLO(...).train() does first: rebuild the model from the YAML stored with it.
rebuilt = DetectionModel(saved.model.yaml, verbose=False)
print(sorted({type(m).__name__ for m in rebuilt.modules()} & {"AWConv", "C2f"}))
from attnconv.integrations.ultralytics import variant_yaml
print(variant_yaml("yolov8n-aw").parent == variant_yaml("yolo11n-aw").parent)
print(variant_yaml("yolov8n-aw").parent)
"""


def test_a_saved_model_rebuilds_in_a_new_process_and_yamls_share_one_cleaned_folder(
        tmp_path, no_network):
    saved = tmp_path / "saved.pt"
    YOLO(variant_yaml("yolov8n-c2f-aw", tmp_path)).save(saved)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _REBUILD_SAVED, str(saved)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]  # was: KeyError: 'C2f_AWConv'
    blocks, shared, folder = done.stdout.strip().splitlines()[-3:]
    assert blocks == "['AWConv', 'C2f']"
    assert shared == "True"  # one folder per process, not one per call
    assert folder and not Path(folder).exists()  # removed when the process ended
