"""tools/trace_summary.py: device time by kernel kind, from jax.profiler and torch.profiler runs."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import trace_summary  # noqa: E402


@pytest.mark.parametrize("name, expected", [
    # cuBLAS on Hopper, cuBLAS/CUTLASS by tile, rocBLAS/hipBLASLt, an XLA Triton GEMM fusion
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_execute_kernel__5x_cublas", "matmul"),
    ("Cijk_Alik_Bljk_BBS_BH_MT128x128x64", "matmul"),
    ("gemm_fusion_dot_37", "matmul"),
    # cuDNN's flash attention names wgmma too: attention wins
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_7_64x64x64_4x1x1_kernel0_0", "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "collective"),
    ("Memcpy HtoD (Pageable -> Device)", "copy"),
    ("loop_multiply_fusion", "other"),
    ("input_reduce_fusion_2", "other"),
    # PyTorch operators (CPU profiles)
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::mul", "other"), ("aten::rms_norm", "other"), ("Optimizer.step#AdamW.step", "other"),
])
def test_kind(name, expected):
    assert trace_summary.kind(name) == expected


def test_kind_from_the_hlo_op():
    """XLA kernels named after their fusion are told apart by the HLO op they ran for."""
    assert trace_summary.kind("fusion_kernel_12", op="custom-call.3 __cudnn$fmha") == "attention"
    assert trace_summary.kind("fusion_kernel_12", op="add.7") == "other"


def test_summarize_per_step():
    events = [  # two steps: a 3 ms matmul and a 1 ms elementwise kernel each, 0.5 ms apart
        {"name": "nvjet_a", "dur": 3000, "ts": 0}, {"name": "loop_add_fusion", "dur": 1000, "ts": 3500},
        {"name": "nvjet_a", "dur": 3000, "ts": 5000}, {"name": "loop_add_fusion", "dur": 1000, "ts": 8500},
    ]
    s = trace_summary.summarize(events, steps=2)
    assert s["busy_ms_per_step"] == pytest.approx(4.0)
    assert s["span_ms_per_step"] == pytest.approx(4.75)  # 0 .. 9.5 ms over 2 steps
    assert s["by_kind"]["matmul"] == {"ms_per_step": pytest.approx(3.0), "share": pytest.approx(0.75)}
    assert s["by_kind"]["other"]["share"] == pytest.approx(0.25)
    assert [t["name"] for t in s["top"]] == ["nvjet_a", "loop_add_fusion"]
    assert s["top"][0]["calls_per_step"] == 1 and s["kernels_per_step"] == 2
    s = trace_summary.summarize([{**e, "row": f"stream {i % 2}"} for i, e in enumerate(events)], steps=2)
    assert s["by_row"] == {"stream 0": pytest.approx(3.0), "stream 1": pytest.approx(1.0)}
    # rows that stand for several launches (torch's key_averages)
    s = trace_summary.summarize([{"name": "aten::mm", "dur": 600, "calls": 6}], steps=2)
    assert s["top"][0]["calls_per_step"] == 3 and "span_ms_per_step" not in s


def test_leaves_drop_spans_around_kernels():
    row = [{"pid": 1, "tid": 7, "name": "while.3", "ts": 0, "dur": 10},  # a loop around two kernels
           {"pid": 1, "tid": 7, "name": "dot.1", "ts": 1, "dur": 4}, {"pid": 1, "tid": 7, "name": "add.2", "ts": 6, "dur": 3},
           {"pid": 1, "tid": 8, "name": "dot.9", "ts": 2, "dur": 5}]  # another row, overlapping in time
    assert sorted(e["name"] for e in trace_summary.leaves(row)) == ["add.2", "dot.1", "dot.9"]
    # Hopper: a kernel starts before the one ahead of it on the same stream ends; both ran
    pdl = [{"pid": 2, "tid": 1, "name": "gemm", "ts": 0, "dur": 10}, {"pid": 2, "tid": 1, "name": "fusion", "ts": 9, "dur": 5}]
    assert sorted(e["name"] for e in trace_summary.leaves(pdl)) == ["fusion", "gemm"]


def test_cli_errors_without_a_trace(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "trace_summary.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "no *.trace.json.gz" in r.stderr


def test_benchmark_profiles_both_frameworks(tmp_path):
    """`tools/benchmark.py --profile_steps`: a real trace of each framework's step, summed by kind."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--layers", "2", "--hidden", "64",
           "--heads", "4", "--kv_heads", "2", "--intermediate", "128", "--vocab", "256", "--batch", "2",
           "--seq", "32", "--steps", "1", "--warmup", "0", "--methods", "full", "--profile_steps", "2",
           "--peak_n", "128", "--peak_reps", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["framework"]: row for row in json.loads(out.read_text())["rows"]}
    for framework, row in rows.items():
        p = row["profile"]
        assert "error" not in p, p
        assert p["steps"] == 2 and p["kernels_per_step"] > 0 and p["busy_ms_per_step"] > 0
        assert sum(k["share"] for k in p["by_kind"].values()) == pytest.approx(1.0)
        assert sum(k["ms_per_step"] for k in p["by_kind"].values()) == pytest.approx(p["busy_ms_per_step"])
        assert f"{framework} full" in r.stdout and "largest kernels:" in r.stdout
    # PyTorch's operators say what they are: a Llama step is matmuls, attention and the rest
    assert {"matmul", "attention", "other"} <= set(rows["peft"]["profile"]["by_kind"])
    assert rows["jaxft"]["profile"]["rows"] == "XLA:CPU worker threads"
