"""trainer.precision=auto: bf16 only where the hardware computes it, the choice recorded."""

import json

import pytest

from vmatdose.training.precision import choose_precision, cpu_flags

AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}
ZEN4 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "amx_bf16", "amx_tile"}


@pytest.mark.parametrize("flags, chosen", [(AVX2_ONLY, "32-true"), (ZEN4, "bf16-mixed"),
                                           (SAPPHIRE_RAPIDS, "bf16-mixed")])
def test_auto_on_cpu_follows_the_bf16_flags(flags, chosen):
    choice = choose_precision("auto", "cpu", flags=flags)
    assert (choice.requested, choice.chosen) == ("auto", chosen)
    assert ("without" in choice.reason) == (chosen == "32-true")


def test_auto_on_cuda_is_bf16_and_an_explicit_setting_is_kept():
    assert choose_precision("auto", "gpu", flags=set()).chosen == "bf16-mixed"
    explicit = choose_precision(32, "cpu", flags=ZEN4)
    assert (explicit.chosen, explicit.reason) == ("32", "set in the config")
    assert choose_precision("16-mixed", "gpu", flags=set()).chosen == "16-mixed"


def test_fp16_on_the_cpu_is_recorded_as_the_bf16_lightning_runs():
    choice = choose_precision("16-mixed", "cpu", flags=ZEN4)
    assert (choice.requested, choice.chosen) == ("16-mixed", "bf16-mixed")
    assert "not supported on the CPU" in choice.reason


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC\n"
                       "flags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_the_run_record_holds_the_choice(tmp_path):
    from omegaconf import OmegaConf

    from vmatdose.records.run_record import write_run_record
    choice = choose_precision("auto", "cpu", flags=AVX2_ONLY)
    path = write_run_record(OmegaConf.create({"seed": 1, "trainer": {"precision": "auto"}}),
                            tmp_path, extra={"precision": choice.to_dict()})
    record = json.loads(path.read_text())
    assert record["precision"] == {"requested": "auto", "chosen": "32-true",
                                   "reason": choice.reason}
    assert record["config"]["trainer"]["precision"] == "auto"
