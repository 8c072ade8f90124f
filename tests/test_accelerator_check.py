"""benchmarks/accelerator_check.py: its CPU dry run (the tiny preset through the accelerator run's code)."""

import re
import sys

import accelerator_check  # benchmarks/ is on pytest's pythonpath (pyproject.toml)


def test_accelerator_config_is_the_7b_layout_at_1b_with_the_bf16_policy():
    config = accelerator_check.check_config(dry_run=False, devices=4)
    assert config.model.preset == "llava_tinyllama_1b" and config.data.image_size == 336
    assert config.model.base_param_dtype == "bfloat16" and not config.model.full_finetune
    assert config.model.remat and config.model.dtype == "bfloat16" and tuple(config.mesh.shape) == (1, 4, 1)
    assert accelerator_check.spec_peak("NVIDIA H200") == 989e12 and accelerator_check.spec_peak("cpu") is None


def test_dry_run_times_a_step_and_exports_every_item(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["accelerator_check.py", "--dry_run", "--steps", "1",
                                      "--export_items", "1000", "--export_batch", "64",
                                      "--set", "stage2.batch_size=16"])
    accelerator_check.main()
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    table = dict(rows[1:])  # after the header
    assert table["compiles of the step"] == "1"  # the timed steps reuse one executable
    assert table["batch (sessions)"] == "16"  # --set applies after the check's own config (tiny: 8)
    assert table["devices"].startswith("8 x")  # the test process's 8 virtual CPU devices, FSDP over all
    assert float(table["step s"]) > 0
    # One export call: its run time and the compile seconds taken out of it.
    export = re.fullmatch(r"([\d.]+) s \(([\d,]+) items/s\), after ([\d.]+) s compiling", table["export 1,000 items"])
    assert export and float(export[3]) > 0
