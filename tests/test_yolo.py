"""YOLOv8n variants with attention convs through attnconv.integrations.ultralytics: build,
parameters and multiply-adds next to plain YOLOv8n, forward pass, one CPU training step.
Nothing is downloaded: models come from YAML and the network is blocked."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch

# ultralytics reads these when it is first imported: settings go to a throw-away folder, and it
# must never go online (weights, fonts, datasets, telemetry).
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="attnconv-yolo-"))
os.environ["YOLO_OFFLINE"] = "1"
pytest.importorskip("ultralytics", reason="the attnconv[yolo] extra is not installed "
                    "(pip install 'attnconv[yolo]'; `make test` installs it via the dev extra)")

from ultralytics import YOLO
from ultralytics.utils import SETTINGS, YAML

from attnconv.detection import make_shapes_dataset
from attnconv.integrations.ultralytics import (
    BLOCKS,
    register,
    variant_yaml,
    variants,
    write_yolo_dataset,
)
from attnconv.layers import create_conv
from attnconv.profiling import count_macs, count_params, markdown_table

SETTINGS.update(sync=False)
register()

VARIANTS = {"yolov8n-rfa": "RFAConv", "yolov8n-rfcbam": "RFCBAMConv",
            "yolov8n-rfca": "RFCAConv", "yolov8n-aw": "AWConv"}
#: Indices of YOLOv8's stride-2 3x3 convs after the stem (backbone 1, 3, 5, 7; head 16, 19).
REPLACED = (1, 3, 5, 7, 16, 19)


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


def test_variants_are_written_from_ultralytics_own_yaml(tmp_path):
    assert variants() == sorted(VARIANTS)
    assert set(VARIANTS.values()) == set(BLOCKS)
    path = variant_yaml("yolov8s-rfca", tmp_path)
    assert path == tmp_path / "yolov8s-rfca.yaml"
    rows = YAML.load(path)["backbone"] + YAML.load(path)["head"]
    assert [i for i, row in enumerate(rows) if row[2] == "RFCAConv"] == list(REPLACED)
    for bad in ("yolov8n-nope", "yolov9n-rfa", "yolov8q-rfa"):
        with pytest.raises(ValueError, match="unknown YOLO variant"):
            variant_yaml(bad)


def test_variants_build_with_papers_placement_and_counts(no_network, one_thread):
    plain = YOLO("yolov8n.yaml").model.eval()  # ultralytics' own YAML, no weights
    x = torch.zeros(1, 3, 640, 640)
    rows = [("YOLOv8n", count_params(plain), count_macs(plain, x))]
    # The official YOLOv8n summary: 3,157,200 parameters, 8.7 GFLOPs (2 x multiply-adds).
    assert rows[0][1] == 3_157_200
    assert 4.3e9 < rows[0][2] < 4.4e9
    for name, block in VARIANTS.items():
        model = YOLO(variant_yaml(name)).model.eval()
        replaced = [i for i, m in enumerate(model.model) if type(m).__name__ == block]
        assert replaced == list(REPLACED)
        assert type(model.model[0]).__name__ == "Conv"  # the stem stays plain
        extra = 0
        for i in REPLACED:
            conv, base = model.model[i].conv, plain.model[i].conv
            assert (conv.in_channels, conv.out_channels, conv.stride) == \
                (base.in_channels, base.out_channels, base.stride)
            reference = create_conv(BLOCKS[block].conv_name, base.in_channels,
                                    base.out_channels, 3, 2, padding=1, bias=False)
            extra += count_params(reference) - count_params(base)
        params, macs = count_params(model), count_macs(model, x)
        assert params - rows[0][1] == extra
        assert macs > rows[0][2]
        with torch.no_grad():
            out = model(torch.rand(2, 3, 64, 64))
        assert out[0].shape == (2, 4 + 80, 8 * 8 + 4 * 4 + 2 * 2)
        rows.append((f"YOLOv8n + {block}", params, macs))
    print("\n" + markdown_table(("model (640x640)", "params (M)", "MACs (G)"),
                                [(n, p / 1e6, m / 1e9) for n, p, m in rows]))
    assert no_network == []


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_trains_one_step_on_cpu(name, tmp_path, no_network, one_thread, monkeypatch):
    import ultralytics.data.utils

    # Fonts are only for plots (disabled here); the dataset check fetches one anyway.
    monkeypatch.setattr(ultralytics.data.utils, "check_font", lambda *a, **k: None)
    shapes = make_shapes_dataset(tmp_path / "shapes", num_train=2, num_val=1, image_size=64)
    data = write_yolo_dataset(shapes, tmp_path / "yolo")
    yolo = YOLO(variant_yaml(name))
    block = VARIANTS[name]
    before = {k: v.clone() for k, v in yolo.model.model[3].state_dict().items()}
    yolo.train(data=str(data), epochs=1, imgsz=64, batch=2, workers=0, device="cpu",
               plots=False, val=False, amp=False, project=str(tmp_path / "runs"), name=name,
               exist_ok=True, verbose=False, seed=0, deterministic=False)
    trained = yolo.trainer.model.model[3]
    assert type(trained).__name__ == block
    changed = [k for k, v in trained.state_dict().items()
               if k in before and not torch.equal(v.cpu().float(), before[k].float())]
    assert any(k.startswith("conv.") and k != "conv.weight" for k in changed), changed
    assert (tmp_path / "runs" / name / "weights" / "last.pt").is_file()
    assert no_network == []
