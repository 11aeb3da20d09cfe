"""The speed benchmark: the CPU preset runs in seconds and writes the pinned JSON; the benchmark networks are the
issue's (8.8 M and 61.8 M parameters, 19.2 and 251 GFLOP per training image)."""

from __future__ import annotations

import json

import pytest

from biasamp import bench
from biasamp.models import build_denoiser


def test_cpu_tiny_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench.main(["--preset", "cpu-tiny", "--workloads", "train_bmnist,sample_bmnist", "--out", str(out),
                         "--steps", "2", "--warmup", "1", "--peak-tflops", "100"])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("device", "device_type", "torch", "date", "config", "peak_tflops", "fast_path", "plain_path",
                "workloads"):
        assert key in saved, key
    assert saved["device_type"] == "cpu" and saved["peak_tflops"] == 100
    assert [w["workload"] for w in saved["workloads"]] == ["train_bmnist", "sample_bmnist"]
    for w in saved["workloads"]:
        assert w["model"] == "tiny" and w["flops_per_image"] > 0 and w["fast_over_plain"] > 0
        for path in ("plain", "fast"):
            fig = w[path]
            assert fig["img_per_s"] > 0 and fig["tflops"] > 0 and fig["warmup_s"] >= 0
            assert fig["fraction_of_peak"] == pytest.approx(fig["tflops"] / 100)
    sample = saved["workloads"][1]
    assert sample["nfe_per_image"] == 3 and sample["rows_per_image"] == 6  # 2 Heun steps, guided
    assert saved["fast_path"]["compile"] is False  # auto: off on the CPU
    printed = capsys.readouterr().out
    assert "| train_bmnist | tiny |" in printed and "fast/plain" in printed


def test_profile_names_where_the_time_goes():
    report = bench.main(["--preset", "cpu-tiny", "--workloads", "sample_bmnist", "--steps", "1", "--warmup", "1",
                         "--profile"])
    for path in ("plain", "fast"):
        prof = report["workloads"][0][path]["profile"]
        top = prof["top"]
        assert 0 < len(top) <= 15 and all(e["self_ms"] > 0 and e["calls"] >= 1 for e in top)
        assert [e["self_ms"] for e in top] == sorted((e["self_ms"] for e in top), reverse=True)
        assert sum(e["share"] for e in top) <= 1 + 1e-9
        assert sum(e["self_ms"] for e in top) <= prof["busy_ms"] * (1 + 1e-9)
        assert prof["busy_fraction"] == pytest.approx(prof["busy_ms"] / prof["wall_ms"])
        assert any("conv" in e["op"] for e in top[:3])  # a conv net spends most of its time in convolutions
        assert "by_kind" not in prof  # kernel kinds are for GPU profiles


@pytest.mark.parametrize(("name", "kind"), [  # kernel names from the H100 profiles in benchmarks/results
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1_g1_"
     "execute_segment_k_off_kernel__5x_cudnn", "matmul/conv"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_TNN", "matmul/conv"),
    ("triton_tem_fused_mm_0", "matmul/conv"),
    ("triton_poi_fused__to_copy_add_clone_convolution_native_dropout_native_group_norm_silu_unsqueeze_24",
     "fused (triton)"),
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_"
     "cuda(at::TensorIteratorBase&)::{lambda()#3}>", "copy/layout"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<float, float, float, false, true, (cudnnKernelDataType_t)0>",
     "copy/layout"),
    ("Memcpy DtoD (Device -> Device)", "copy/layout"),
    ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<float>(long, float, float const*, float*)",
     "other"),
    ("dgrad2d_c1_k1_nhwc", "other"),  # the depthwise FIR resampling, not a tensor-core GEMM
])
def test_kernel_kinds(name, kind):
    assert bench.kernel_kind(name) == kind


def test_bad_workload_is_refused():
    with pytest.raises(SystemExit) as err:
        bench.main(["--workloads", "train_bmnist,nonsense"])
    assert err.value.code == 2


def test_bench_networks_are_the_issues():
    expected = {"train_bmnist": 8_797_379, "train_64": 61_804_803, "train_32": 55_734_147}
    for name, params in expected.items():
        w = bench.WORKLOADS[name]
        net = build_denoiser(bench.model_config(w.model), w.img_resolution, 3, w.label_dim)
        assert sum(p.numel() for p in net.parameters()) == params, name
    w = bench.WORKLOADS["train_bmnist"]
    assert bench.train_flops_per_image(bench.model_config(w.model), w) / 1e9 == pytest.approx(19.2, abs=0.05)


TINY = ["--preset", "cpu-tiny", "--steps", "1", "--warmup", "1"]


def test_resume_runs_only_the_missing_workloads(tmp_path, monkeypatch):
    first = tmp_path / "first.json"
    bench.main([*TINY, "--workloads", "train_bmnist", "--out", str(first)])
    ran = []
    real = bench.run_workload
    monkeypatch.setattr(bench, "run_workload", lambda w, *a: ran.append(w.name) or real(w, *a))
    both = tmp_path / "both.json"
    report = bench.main([*TINY, "--workloads", "train_bmnist,sample_bmnist", "--resume", str(first),
                         "--out", str(both)])
    assert ran == ["sample_bmnist"]  # train_bmnist came from the earlier report
    saved = json.loads(both.read_text())
    assert [w["workload"] for w in saved["workloads"]] == ["train_bmnist", "sample_bmnist"]
    assert saved["workloads"][0] == json.loads(first.read_text())["workloads"][0]
    assert saved["workloads"][0]["date"] <= saved["workloads"][1]["date"]  # each workload keeps its own date
    assert saved["complete"] is True and report["complete"] is True


def test_resume_refuses_a_report_measured_otherwise(tmp_path):
    first = tmp_path / "first.json"
    bench.main([*TINY, "--workloads", "train_bmnist", "--out", str(first)])
    with pytest.raises(SystemExit, match="config.steps is 1 there but 2"):
        bench.main(["--preset", "cpu-tiny", "--steps", "2", "--warmup", "1", "--resume", str(first)])
    with pytest.raises(SystemExit, match="no such file"):
        bench.main([*TINY, "--resume", str(tmp_path / "missing.json")])


def _fail_train_bmnist(monkeypatch):
    """Make the train_bmnist workload raise (as an out-of-memory would); the others run for real."""
    real = bench.run_workload

    def failing(w, *a):
        if w.name == "train_bmnist":
            raise RuntimeError("CUDA out of memory (injected)")
        return real(w, *a)

    monkeypatch.setattr(bench, "run_workload", failing)
    return real


def test_a_failed_workload_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    real = _fail_train_bmnist(monkeypatch)
    out = tmp_path / "bench.json"
    report = bench.main([*TINY, "--workloads", "train_bmnist,sample_bmnist", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and report["complete"] is False
    failed, ok = saved["workloads"]
    assert failed["workload"] == "train_bmnist" and failed["error"] == "RuntimeError: CUDA out of memory (injected)"
    assert "injected" in failed["traceback"] and "plain" not in failed  # it failed before measuring anything
    assert ok["workload"] == "sample_bmnist" and ok["fast"]["img_per_s"] > 0
    # a resume reruns the failed workload only
    monkeypatch.setattr(bench, "run_workload", real)
    again = bench.main([*TINY, "--workloads", "train_bmnist,sample_bmnist", "--resume", str(out)])
    assert [w["workload"] for w in again["workloads"]] == ["sample_bmnist", "train_bmnist"]
    assert again["complete"] is True


def test_a_profiler_failure_keeps_the_timings():
    figures = {"img_per_s": 1.0}
    bench._add_profile(figures, lambda: 1 / 0, bench.torch.device("cpu"))
    assert figures == {"img_per_s": 1.0, "profile_error": "ZeroDivisionError: division by zero"}


def test_a_failure_not_retried_stays_in_the_resumed_report(tmp_path, monkeypatch):
    """Command 1 runs two workloads, one of which fails; command 2 resumes with another workload only: the
    failure must stay visible and the report incomplete until that workload is measured."""
    real = _fail_train_bmnist(monkeypatch)
    first = tmp_path / "first.json"
    bench.main([*TINY, "--workloads", "train_bmnist,train_32", "--out", str(first)])
    monkeypatch.setattr(bench, "run_workload", real)
    second = tmp_path / "second.json"
    report = bench.main([*TINY, "--workloads", "sample_bmnist", "--resume", str(first), "--out", str(second)])
    assert report["requested"] == ["train_bmnist", "train_32", "sample_bmnist"]
    assert [(w["workload"], "error" in w) for w in report["workloads"]] == [
        ("train_bmnist", True), ("train_32", False), ("sample_bmnist", False)]
    assert report["complete"] is False and json.loads(second.read_text())["complete"] is False
    third = bench.main([*TINY, "--workloads", "train_bmnist", "--resume", str(second)])
    assert third["complete"] is True and [w["workload"] for w in third["workloads"]] == [
        "train_32", "sample_bmnist", "train_bmnist"]


def test_a_fast_path_failure_keeps_the_plain_figures(tmp_path, monkeypatch, capsys):
    real = bench._sample_runner

    def fast_fails(model_cfg, w, device, fast, *a):
        if fast is not None:
            raise RuntimeError("compile failed\nsecond line | with a bar")
        return real(model_cfg, w, device, fast, *a)

    monkeypatch.setattr(bench, "_sample_runner", fast_fails)
    report = bench.main([*TINY, "--workloads", "sample_bmnist"])
    (entry,) = report["workloads"]
    assert entry["error"] == "RuntimeError: compile failed" and entry["plain"]["img_per_s"] > 0
    assert "fast" not in entry and report["complete"] is False
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sample_bmnist"))
    assert "FAILED: RuntimeError: compile failed |" in row and "second line" not in row


def test_resume_refuses_a_json_that_is_not_a_report(tmp_path):
    bad = tmp_path / "list.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="not a biasamp.bench report"):
        bench.main([*TINY, "--resume", str(bad)])


def test_fast_path_switches_follow_the_flags():
    cpu, cuda = bench.torch.device("cpu"), bench.torch.device("cuda")
    auto = bench.parse_args([])
    assert bench.fast_switches(auto, cpu)["compile"] is False and bench.fast_switches(auto, cuda)["compile"] is True
    forced = bench.fast_switches(bench.parse_args(["--compile", "true", "--channels-last", "false",
                                                   "--precision", "bf16"]), cpu)
    assert forced["compile"] is True and forced["channels_last"] is False and forced["precision"] == "bf16"
    assert bench.fast_switches(bench.parse_args(["--compile", "false"]), cuda)["compile"] is False
