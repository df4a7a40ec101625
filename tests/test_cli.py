"""The command line as a whole: options parse as their types say, no abbreviations, every
refusal is one line on stderr with exit status 2 (``--debug`` shows the traceback), and
``--help`` does not import Lightning."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnconv.classification.config import ClassificationConfig
from attnconv.cli import build_parser, main
from attnconv.convert import convert_model
from attnconv.detection.config import DetectionConfig
from attnconv.engine.config import config_from_args
from attnconv.models import create_model
from attnconv.segmentation.config import SegmentationConfig

ROOT = Path(__file__).resolve().parents[1]


def _config(argv: list[str]) -> ClassificationConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]), ClassificationConfig())


def test_numbers_parse_as_their_fields_types() -> None:
    cfg = _config(["--optim.lr", "1e-3", "--data.image_size", "16",
                   "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0.5",
                   "--trainer.devices", "2", "--name", "1e-3", "--optim.milestones", "[2, 4]"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)  # YAML 1.1: a string
    assert cfg.data.image_size == 16 and isinstance(cfg.data.image_size, int)
    # An int is a number of batches for Lightning (1 = one batch), a float a share.
    assert cfg.trainer.limit_train_batches == 1 and type(cfg.trainer.limit_train_batches) is int
    assert cfg.trainer.limit_val_batches == 0.5
    assert cfg.trainer.devices == "2" and cfg.name == "1e-3"
    assert cfg.optim.milestones == [2, 4]


def test_a_recipe_value_like_1e_3_is_a_float(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: {lr: 1e-3}\ntrainer: {limit_train_batches: 3}\n")
    cfg = _config(["--config", str(recipe)])
    assert cfg.optim.lr == 0.001 and cfg.trainer.limit_train_batches == 3


@pytest.mark.parametrize("argv", [
    ["train", "--trainer.max_epoch", "3"],  # was run as --trainer.max_epochs
    ["train", "--optim.l", "0.1"],
    ["compare", "resnet18", "--model", "resnet50"],  # was accepted and ignored
    ["compare", "resnet18", "--mod", "resnet50"],
    ["train-det", "--data.batch", "2"],
])
def test_abbreviations_and_options_a_command_ignores_are_refused(
        argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "hint"), [
    (["train", "--trainer.max_epoch", "3"], "did you mean --trainer.max_epochs"),
    (["train", "--optim.lrr", "0.1"], "did you mean --optim.lr"),
    (["train-det", "--data.batch", "2"], "did you mean --data.batch_size"),
    (["export", "resnet18", "--ouptut", "x.onnx"], "did you mean --output"),
])
def test_an_unknown_option_names_the_commands_close_options(
        argv: list[str], hint: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {argv[-2]} {argv[-1]}; {hint}" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--model", "resnet18_wa"], "unknown model 'resnet18_wa'; close names: resnet18_aw"),
    (["train", "--data.name", "cifar10"], "data.root is required for data.name=cifar10"),
    (["train", "--optim.lr", "fast"], "optim.lr must be a number, not 'fast'"),
    (["train", "--trainer.max_epochs", "0"], "trainer.max_epochs must be >= 1, not 0"),
    (["train", "--trainer.max_epochs", "-1"], "trainer.max_epochs must be >= 1, not -1"),
    (["train", "--optim.scheduler", "cosin"], "optim.scheduler must be one of multistep, cosine"),
    (["train", "--data.batch_size", "1.5"], "data.batch_size must be an integer, not 1.5"),
    (["train", "--config", "cifar1O"], "recipe cifar1O is neither a file nor a shipped recipe"),
    (["train", "--model_args", "[1, 2]"], "model_args must be a mapping"),
    (["compare", "resnet18", "resnt50"], "unknown model 'resnt50'; close names: resnet50"),
    (["compare", "resnet18", "--seeds", "0"], "seeds must be >= 1, not 0"),  # StopIteration
    (["demo", "--seeds", "0"], "seeds must be >= 1, not 0"),
    (["eval", "--checkpoint", "nowhere.ckpt"], "checkpoint nowhere.ckpt does not exist"),
    (["train-det", "--data.batch_size", "two"], "data.batch_size must be an integer"),
    (["train-det", "--model", "resnet18_wa"], "unknown model 'resnet18_wa'"),
    # A recipe names its task; another task's command refuses it, naming the right one.
    (["train-det", "--config", "imagenet_rfaconv"], "recipe imagenet_rfaconv is for "
     "classification, not detection: use attnconv train --config imagenet_rfaconv"),
    (["train", "--config", "fasterrcnn_r101_aw_coco_1x"], "recipe fasterrcnn_r101_aw_coco_1x is "
     "for detection, not classification: use attnconv train-det --config "
     "fasterrcnn_r101_aw_coco_1x"),
    (["train-seg", "--config", "demo"], "use attnconv train --config demo"),
    (["compare", "resnet18", "--config", "deeplabv3_voc_aug"],
     "use attnconv train-seg --config deeplabv3_voc_aug"),
    (["train-det", "--model_args", "{representation_sise: 8}"],
     "did you mean representation_size"),
    (["train-det", "--data.train_images", "x"], "give all four of data.train_images"),
    (["export", "resnet18_wa"], "unknown model 'resnet18_wa'"),
    # Options Lightning's Trainer refuses (these were tracebacks).
    (["train", "--config", "demo", "--trainer.limit_train_batches", "-1"],
     "trainer.limit_train_batches must be >= 0"),
    (["train", "--config", "demo", "--trainer.limit_val_batches", "1.5"],
     "Lightning refused the trainer options: You have passed invalid value 1.5"),
    (["train", "--config", "demo", "--trainer.precision", "7"],
     "Lightning refused the trainer options: Precision '7' is invalid"),
    (["train", "--config", "demo", "--trainer.strategy", "bogus"],
     "Lightning refused the trainer options: You selected an invalid strategy name"),
    (["train", "--config", "demo", "--trainer.devices", "0"],
     "Lightning refused the trainer options: `Trainer(devices=0)`"),
    (["bench", "resnet18_wa"], "unknown model 'resnet18_wa'; close names: resnet18_aw"),
])
def test_refusals_are_one_line_on_stderr_with_status_2(
        argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out_dir = ["--out_dir", str(tmp_path / "runs")] if argv[0] in ("train", "train-det",
                                                                    "train-seg", "compare") \
        else []
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, *out_dir])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert message in err
    assert err.count("\n") == 1 and err.startswith(f"attnconv {argv[0]}: ")
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    from attnconv.models import ModelNameError

    with pytest.raises(ModelNameError, match="resnet18_wa"):
        main(["--debug", "train", "--model", "resnet18_wa", "--out_dir", str(tmp_path)])
    with pytest.raises(ModelNameError):
        main(["train", "--model", "resnet18_wa", "--out_dir", str(tmp_path), "--debug"])


def test_a_checkpoint_that_is_not_one_is_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint at all")
    state = tmp_path / "state.pt"
    torch.save({"a": torch.zeros(1)}, state)
    for argv in (["eval", "--checkpoint", str(junk)],
                 ["eval", "--checkpoint", str(state)],
                 ["export", "resnet18", "--checkpoint", str(state), "--output",
                  str(tmp_path / "m.onnx")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_of_the_other_task_is_named_as_such(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Not "unknown config key 'data.num_classes'": the refusal names the command to use.
    det, cls = tmp_path / "det.ckpt", tmp_path / "cls.ckpt"
    torch.save({"attnconv": {"config": dataclasses.asdict(DetectionConfig()), "num_classes": 4},
                "state_dict": {}}, det)
    torch.save({"attnconv": {"config": ClassificationConfig().to_dict(), "num_classes": 10,
                             "in_chans": 1, "image_size": 16}, "state_dict": {}}, cls)
    for argv, message in (
            (["eval", "--checkpoint", str(det)], "is a detection checkpoint of `attnconv "
             "train-det`, not a classifier of `attnconv train` (eval-det evaluates it)"),
            (["export", "resnet18", "--checkpoint", str(det)], "is a detection checkpoint"),
            (["eval-det", str(cls)], "is a classification checkpoint of `attnconv train`, not "
             "of `attnconv train-det`: use attnconv eval --checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and err.count("\n") == 1, err


def test_detection_uses_the_same_config_system() -> None:
    args = build_parser().parse_args(
        ["train-det", "--config", "fasterrcnn_r101_aw_coco_1x", "--optim.lr", "1e-2",
         "--trainer.limit_train_batches", "2", "--model_args", "{min_size: 600}"])
    cfg = config_from_args(args, DetectionConfig())
    assert cfg.optim.lr == 0.01 and cfg.trainer.limit_train_batches == 2
    assert cfg.model_args["min_size"] == 600 and cfg.model_args["max_size"] == 1333
    assert cfg.model == "resnet101_aw"


def test_the_tasks_share_one_run_config_and_one_trainer_section() -> None:
    from attnconv.engine.config import RunConfig, TrainerConfig
    from attnconv.segmentation.config import SegmentationConfig

    for task in (ClassificationConfig, DetectionConfig, SegmentationConfig):
        assert issubclass(task, RunConfig)
        assert type(task().trainer) is TrainerConfig
        assert RunConfig.TASKS[task.task] is task
    assert {f.name for f in dataclasses.fields(RunConfig)} <= {
        f.name for f in dataclasses.fields(SegmentationConfig)}


@pytest.mark.slow
def test_help_does_not_import_lightning() -> None:
    code = ("import sys\nfrom attnconv.cli import main\n"
            "for cmd in ([], ['train'], ['train-det'], ['compare'], ['export'], ['viz']):\n"
            "    try:\n        main([*cmd, '--help'])\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'pycocotools', 'sklearn', 'matplotlib')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
def test_the_layers_and_the_zoo_import_without_the_training_extras() -> None:
    code = ("import sys, attnconv\nfrom attnconv.classification.loading import load_model\n"
            "attnconv.create_model('resnet18_aw', num_classes=3)\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'torchmetrics', "
            "'pycocotools', 'sklearn', 'tensorboard', 'matplotlib'}))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_convert_model_refuses_an_unknown_conv_name() -> None:
    # Not every conv skipped with the error as its reason and the model returned.
    with pytest.raises(ValueError, match="bogus"):
        convert_model(create_model("resnet18", num_classes=2), conv="bogus")


def _doc_commands() -> list[list[str]]:
    """The ``attnconv`` command lines of the shell blocks of README.md and docs/*.md
    (continuations joined, comments dropped), as argument lists after ``attnconv``."""
    import shlex

    commands = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        in_shell = False
        for line in page.read_text().replace("\\\n", " ").splitlines():
            if line.startswith("```"):
                in_shell = not in_shell and line.strip() in ("```bash", "```sh")
                continue
            if not in_shell or not line.startswith(("attnconv ", "torchrun ")):
                continue
            words = shlex.split(line, comments=True)
            if words[:1] == ["torchrun"] and "attnconv.cli" in words:
                words = ["attnconv", *words[words.index("attnconv.cli") + 1:]]
            if words[:1] == ["attnconv"] and "..." not in words and "my_recipe.yaml" not in words:
                commands.append(words[1:])
    return commands


def test_the_docs_commands_are_accepted() -> None:
    commands = _doc_commands()
    assert len(commands) >= 36  # the README's and docs/'s examples were found
    assert {argv[0] for argv in commands} >= {"train", "compare", "eval", "train-det",
                                              "train-seg", "export", "viz", "bench"}
    for argv in commands:
        args = build_parser().parse_args(argv)
        if argv[0] in ("train", "compare"):
            config_from_args(args, ClassificationConfig())
        elif argv[0] == "train-det":  # what parses but Faster R-CNN would refuse later
            config_from_args(args, DetectionConfig()).check()
        elif argv[0] == "train-seg":
            config_from_args(args, SegmentationConfig())


@pytest.mark.parametrize("command", ["train", "train-det", "train-seg"])
@pytest.mark.parametrize("options, asked", [
    (["--trainer.accelerator", "gpu"], "trainer.accelerator gpu: this machine has 0 GPUs"),
    (["--trainer.accelerator", "gpu", "--trainer.devices", "2"],
     "trainer.devices 2: this machine has 0 GPUs"),
    (["--trainer.accelerator", "auto", "--trainer.devices", "2"],
     "trainer.devices 2: this machine has 0 GPUs")])
def test_every_task_refuses_missing_gpus_with_the_cpu_hint(
        command: str, options: list[str], asked: str, tmp_path: Path,
        capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as exit_info:
        main([command, *options, "--out_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert asked in err and "say --trainer.accelerator cpu" in err, err
    assert not (tmp_path / "runs").exists()


def test_recipes_lists_each_recipes_command_and_whole_first_sentence(
        capsys: pytest.CaptureFixture) -> None:
    from attnconv.recipes import list_recipes

    main(["recipes"])
    out = capsys.readouterr().out
    assert "attnconv train --config demo\n" in out
    assert "attnconv train-det --config fasterrcnn_r101_aw_coco_1x\n" in out
    assert "attnconv train-seg --config deeplabv3_voc_aug\n" in out
    entries = ("\n" + out.split("\n\n")[0]).split("\nattnconv ")[1:]
    assert len(entries) == len(list_recipes())
    for entry in entries:
        command, description = entry.split("\n", 1)
        assert command.startswith(("train --config", "train-det --config", "train-seg --config"))
        assert description.rstrip().endswith(".") and description.startswith("    "), entry
    # A sentence runs across the recipe's comment lines and past "et al.".
    assert "(He et al. 2016, adapted to 200 epochs" in " ".join(out.split())
    assert "the setting of Chen et al., \"Rethinking Atrous" in " ".join(out.split())


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_zero_prints_the_results(rank: int, tmp_path: Path,
                                           capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    import attnconv.classification.run as cls_run
    import attnconv.segmentation.run as seg_run
    from attnconv.detection.coco_eval import COCO_METRICS
    from attnconv.detection.run import _report

    monkeypatch.setattr(rank_zero_only, "rank", rank)  # as under torchrun, or the trainer's
    monkeypatch.setattr(cls_run, "train", lambda cfg: SimpleNamespace(
        run_dir=tmp_path, best_checkpoint=None, plot=None, note=lambda: "figures of epoch 1/1"))
    monkeypatch.setattr(cls_run, "summary_table", lambda results: "| train table |")
    monkeypatch.setattr(cls_run, "compare", lambda models, seeds, cfg: SimpleNamespace(
        table="| compare table |", plot=tmp_path / "compare.png"))
    monkeypatch.setattr(seg_run, "train", lambda cfg: SimpleNamespace(
        report=lambda: "| seg table |", run_dir=tmp_path, best_checkpoint=None))
    main(["train", "--out_dir", str(tmp_path)])
    main(["compare", "resnet18", "--out_dir", str(tmp_path)])
    main(["train-seg", "--out_dir", str(tmp_path)])
    _report("fasterrcnn", dict.fromkeys(COCO_METRICS, 50.0), tmp_path, tmp_path / "d.pt", 1.0,
            "figures of epoch 1/1 (the last)")
    out = capsys.readouterr().out
    tables = ("| train table |", "| compare table |", "| seg table |", "COCO box metrics")
    if rank == 0:
        assert all(table in out for table in tables), out
    else:
        assert out == ""


def test_demo_prints_the_speed_of_its_models_timed_side_by_side(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    import attnconv.classification.demo as demo
    import attnconv.classification.run as cls_run

    timed = []
    monkeypatch.setattr(cls_run, "compare", lambda models, seeds, cfg: SimpleNamespace(
        table="| accuracy table |", plot=tmp_path / "compare.png"))
    monkeypatch.setattr(demo, "throughput_report", lambda models, cfg, sets: timed.append(
        (list(models), sets.image_size)) or "| speed table, load average |")
    main(["demo", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert timed == [(list(demo.DEMO_MODELS), 16)]  # once, all three, at the recipe's size
    assert out.index("| accuracy table |") < out.index("| speed table, load average |")
