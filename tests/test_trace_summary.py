import json

import pytest

from scripts.trace_summary import busy_time, group_of, load_events, summarize


def test_busy_time_is_the_union_of_overlapping_kernels():
    assert busy_time([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert busy_time([]) == 0


@pytest.mark.parametrize(("name", "group"), [
    ("_persistent_tma_scaled_int8_mm_kernel", "INT8 matmuls (qt)"),
    ("_gluon_scaled_int8_mm_kernel", "INT8 matmuls (qt)"),
    ("triton_per_fused___rshift____to_copy_abs_add_amax_scaled_int8_mm_gluon_silu_t_view_where_12",
     "Inductor's fused kernels"),
    ("_tile_quantize_kernel", "qt quantize kernels"),
    ("_to_column_major_kernel", "qt column-major copies of INT8 codes"),
    ("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNT", "cuBLAS / CUTLASS matmuls"),
    ("triton_red_fused__to_copy_abs_amax_t_0", "Inductor's fused kernels"),
    ("ncclDevKernel_AllGather_RING_LL", "communication (NCCL)"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel", "optimizer (fused / foreach; qt's INT8 Adam)"),
    ("_int8_rows_adam_kernel", "optimizer (fused / foreach; qt's INT8 Adam)"),
    ("something_new", "other"),
])
def test_kernels_are_grouped_by_what_they_do(name, group):
    assert group_of(name) == group


def test_summary_per_step_from_a_trace(tmp_path):
    kernel = {"ph": "X", "cat": "kernel"}
    events = [{**kernel, "name": "_scaled_int8_mm_kernel", "ts": 0, "dur": 3000},
              {**kernel, "name": "ncclDevKernel_AllGather", "ts": 1000, "dur": 4000},  # overlaps the matmul
              {**kernel, "name": "triton_poi_fused_0", "ts": 8000, "dur": 2000},
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 99000}]  # host ops are not GPU time
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    summary = summarize(load_events(path), steps=2)
    assert summary["wall_ms"] == pytest.approx(10 / 2)
    assert summary["busy_ms"] == pytest.approx(7 / 2)
    assert summary["compute_busy_ms"] == pytest.approx(5 / 2)  # the all-gather's last 2 ms overlapped nothing
    assert summary["groups_ms"] == {"communication (NCCL)": 2.0, "INT8 matmuls (qt)": 1.5, "Inductor's fused kernels": 1.0}


def test_several_traces_give_a_table_each_and_a_missing_one_a_clear_error(tmp_path):
    from scripts.trace_summary import main

    kernel = {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_0", "ts": 0}
    for name, dur in (("a", 1000), ("b", 3000)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"traceEvents": [{**kernel, "dur": dur}]}))
    text = main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--steps", "1"])
    assert text.index("a.json") < text.index("b.json")
    assert "| Inductor's fused kernels | 1.0 |" in text and "| Inductor's fused kernels | 3.0 |" in text
    long_name = "triton_red_fused_" + "x" * 120 + "_view_7"
    (tmp_path / "c.json").write_text(json.dumps({"traceEvents": [
        {**kernel, "name": long_name, "dur": 300}, {**kernel, "name": long_name, "ts": 500, "dur": 300},
        {**kernel, "name": "triton_poi_fused_1", "ts": 900, "dur": 100}]}))
    listed = main([str(tmp_path / "c.json"), "--steps", "1", "--kernels", "1"])
    assert "_view_7` | 0.60 | 2 | 300.0 |" in listed and "triton_poi_fused_1" not in listed
    with pytest.raises(SystemExit):
        main([str(tmp_path / "c.json"), "--kernels", "0"])
    with pytest.raises(SystemExit, match="no trace at .*missing.json"):
        main([str(tmp_path / "a.json"), str(tmp_path / "missing.json")])


def test_idle_stretches_are_set_against_the_host_op_that_launched_the_kernel_ending_them():
    from scripts.trace_summary import idle_causes

    def kernel(ts, dur, correlation):
        return {"ph": "X", "cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    def launch(ts, correlation, tid=1):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1, "tid": tid,
                "args": {"correlation": correlation}}

    def host(name, ts, dur, tid=1):
        return {"ph": "X", "cat": "user_annotation", "name": name, "ts": ts, "dur": dur, "tid": tid}

    events = [host("ProfilerStep#3", 0, 10_000), host("FSDP::pre_forward (model.layers.7)", 90, 30),
              host("aten::_foreach_copy_", 100, 5),  # inside pre_forward: the outermost op names the gap
              host("autograd::engine::evaluate_function: X", 300, 50, tid=2),
              kernel(0, 50, 1), launch(1, 1),
              kernel(110, 40, 2), launch(101, 2),  # idle 50-110 us: pre_forward's launch
              kernel(120, 100, 3), launch(105, 3),  # overlaps: no idle stretch
              kernel(400, 10, 4), launch(310, 4, tid=2),  # idle 220-400 us: the backward's launch
              kernel(500, 10, 5), launch(600, 5, tid=3)]  # idle 410-500 us, launched outside any host op
    causes = idle_causes(events, steps=2)
    assert causes == [("autograd::engine::evaluate_function: X", 0.09, 0.5),
                      ("(no host op around it)", 0.045, 0.5),
                      ("FSDP::pre_forward (model.layers.N)", 0.03, 0.5)]


def test_host_ops_sum_each_launching_threads_outermost_ops_per_step():
    from scripts.trace_summary import host_ops, main

    op = {"ph": "X", "cat": "cpu_op"}
    launch = {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 5}
    events = [
        {**op, "tid": 1, "name": "FSDP::pre_forward (model.layers.0)", "ts": 0, "dur": 100},
        {**op, "tid": 1, "name": "aten::copy_", "ts": 10, "dur": 50},  # inside the hook: not counted again
        {**op, "tid": 1, "name": "FSDP::pre_forward (model.layers.1)", "ts": 200, "dur": 300},
        {**op, "tid": 1, "name": "Torch-Compiled Region: 3/0", "ts": 600, "dur": 400},
        {**op, "tid": 1, "name": "ProfilerStep#3", "ts": 0, "dur": 5000},  # the step itself: left out
        {**op, "tid": 2, "name": "autograd::engine::evaluate_function: CompiledFunctionBackward", "ts": 0, "dur": 900},
        {**op, "tid": 3, "name": "a thread that launched nothing", "ts": 0, "dur": 9000},
        {**launch, "tid": 1, "ts": 20}, {**launch, "tid": 1, "ts": 700}, {**launch, "tid": 2, "ts": 10},
        {**launch, "tid": 4, "ts": 30}, {**launch, "tid": 4, "ts": 40}, {**launch, "tid": 4, "ts": 50},  # no host ops
    ]
    (tid, inside_ms, ops), (backward_tid, backward_ms, backward_ops) = host_ops(events, steps=2, top=5)
    assert (tid, inside_ms) == (1, pytest.approx(0.8 / 2))
    assert ops == [("FSDP::pre_forward (model.layers.N)", pytest.approx(0.2), 1.0),
                   ("Torch-Compiled Region", pytest.approx(0.2), 0.5)]
    assert (backward_tid, backward_ms) == (2, pytest.approx(0.45))
    assert backward_ops == [("autograd::engine::evaluate_function: CompiledFunctionBackward", pytest.approx(0.45), 0.5)]
    assert host_ops([{**op, "tid": 1, "name": "x", "ts": 0, "dur": 1}], steps=1, top=3) == []
    with pytest.raises(SystemExit):
        main(["missing.json", "--host_ops", "-1"])
