// janus_rt._C: PYBIND11_MODULE only (the declarations in ops.h); one .cpp per op holds the implementation.
// Every function takes raw data pointers (tensor.data_ptr()) and sizes; janus_rt/cpu_ops.py is the only caller
// and checks dtypes, contiguity, devices and shapes first. Sizes are guarded again here (std::invalid_argument ->
// ValueError). dtype codes: 0 = fp32, 1 = bf16 (passed as uint16 bits).
#include <cstdint>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "ops.h"

namespace py = pybind11;
using jr::ptr_t;

PYBIND11_MODULE(_C, m) {
  m.doc() = "janus_rt CPU kernels (OpenMP); call through janus_rt.cpu_ops";
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("vq_nearest", &jr::vq_nearest, release(), "out[N] = argmin_j ||z_i - codebook_j||^2",
        py::arg("z"), py::arg("codebook"), py::arg("out"), py::arg("N"), py::arg("K"), py::arg("D"));
  m.def("paged_decode_attention", &jr::paged_decode_attention, release(), "o = softmax(q k^T * scale) v, paged KV",
        py::arg("q"), py::arg("q_dtype"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_dtype"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("o"), py::arg("B"), py::arg("H"), py::arg("Hkv"),
        py::arg("D"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("sm_scale"),
        py::arg("k_scale") = 0, py::arg("v_scale") = 0);
  m.def("kv_quantize", &jr::kv_quantize, release(), "rows -> int8 rows and fp32 scales (the int8 KV cache's)",
        py::arg("x"), py::arg("dtype"), py::arg("q"), py::arg("scale"), py::arg("rows"), py::arg("D"));
  m.def("kv_store", &jr::kv_store, release(), "cache rows[slot_mapping[i]] = k[i], v[i]; slot < 0 skipped",
        py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"), py::arg("N"),
        py::arg("row_elems"), py::arg("elem_size"), py::arg("num_slots"));
  m.def("cfg_sample", &jr::cfg_sample, release(), "one token per row: CFG, temperature, top-k/top-p, Gumbel-max",
        py::arg("cond"), py::arg("uncond"), py::arg("cfg_weight"), py::arg("temperature"), py::arg("top_k"),
        py::arg("top_p"), py::arg("seeds"), py::arg("greedy"), py::arg("out"), py::arg("B"), py::arg("V"),
        py::arg("ldc"), py::arg("ldu"), py::arg("cond_rows") = 0, py::arg("uncond_rows") = 0, py::arg("rows") = 0);
  m.def("linear", &jr::linear, release(), "y[M, N] = x[M, K] @ w[N, K]^T (+ bias)", py::arg("x"), py::arg("x_dtype"),
        py::arg("w"), py::arg("w_dtype"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"));
  m.def("decode_layer", &jr::decode_layer, release(), "one decoder layer for one token per row, h updated in place",
        py::arg("h"), py::arg("dtype"), py::arg("in_norm"), py::arg("qkv"), py::arg("o"), py::arg("post_norm"),
        py::arg("gate_up"), py::arg("down"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slot_mapping"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("cos"), py::arg("sin"), py::arg("R"), py::arg("C"),
        py::arg("H"), py::arg("I"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"),
        py::arg("eps"), py::arg("sm_scale"), py::arg("final_norm"), py::arg("out"), py::arg("final_eps"),
        py::arg("packed"), py::arg("k_scale") = 0, py::arg("v_scale") = 0);
  m.def("decode_phase_timing", &jr::decode_phase_timing, "time decode_layer's phases (thread 0, after each barrier)",
        py::arg("on"));
  m.def("decode_phase_count", &jr::decode_phase_count, "number of decode_layer phases");
  m.def("decode_phase_name", &jr::decode_phase_name, "name of decode_layer phase i", py::arg("i"));
  m.def("decode_phase_read", &jr::decode_phase_read, "seconds[phases] = accumulated phase times -> timed calls",
        py::arg("seconds"), py::arg("reset"));
  m.def("packed_available", &jr::packed_available, "whether this build has the packed GEMV for this dtype",
        py::arg("dtype"));
  m.def("amx_available", &jr::amx_available, "whether bf16 packed GEMVs run on AMX tiles (build, CPU, OS and set_amx)");
  m.def("amx_w8a8_available", &jr::amx_w8a8_available,
        "whether W8A8 GEMVs of 4+ rows run on AMX-INT8 tiles (build, CPU, OS and set_amx)");
  m.def("set_amx", &jr::set_amx, "turn the AMX routes of the packed GEMVs on or off; returns the old setting",
        py::arg("on"));
  m.def("packed_size", &jr::packed_size, "elements of a packed [N, K] weight", py::arg("N"), py::arg("K"),
        py::arg("dtype"));
  m.def("packed_layout", &jr::packed_layout, "(columns a strip, steps a K tile, runs a K tile is stored as) of the "
        "packed layout for this dtype (csrc/packed_layout.h)", py::arg("dtype"));
  m.def("pack_weight", &jr::pack_weight, release(), "wp = W [N, K] in the packed GEMV's strip layout",
        py::arg("w"), py::arg("wp"), py::arg("N"), py::arg("K"), py::arg("dtype"));
  m.def("pack_int8", &jr::pack_int8, release(), "wp = int8 Q [N, K] and its fp32 row scales in the int8 GEMV's layout",
        py::arg("q"), py::arg("scales"), py::arg("wp"), py::arg("N"), py::arg("K"));
  m.def("pack_w8a8", &jr::pack_w8a8, release(), "wp = int8 Q [N, K] (offset by 128) and its fp32 row scales in the "
        "W8A8 GEMV's layout", py::arg("q"), py::arg("scales"), py::arg("wp"), py::arg("N"), py::arg("K"));
  m.def("linear_packed", &jr::linear_packed, release(), "y[M, N] = x[M, K] @ W^T (+ bias), W packed, x in W's dtype",
        py::arg("x"), py::arg("wp"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("dtype"));
  m.def("mlp_gelu", &jr::mlp_gelu, release(), "Linear -> GELU(erf) -> Linear for decode-sized x, fp32 output",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("y"), py::arg("dtype"),
        py::arg("M"), py::arg("K"), py::arg("H"), py::arg("N"), py::arg("packed"), py::arg("round_out") = false);
  m.def("gather_rows", &jr::gather_rows, release(), "dst[i] = src[idx[i]] (rows), converted to dst's dtype",
        py::arg("src"), py::arg("src_dtype"), py::arg("idx"), py::arg("dst"), py::arg("dst_dtype"), py::arg("n"),
        py::arg("cols"), py::arg("src_rows"));
  m.def("swiglu", &jr::swiglu, release(),
        "out[R, n] = silu(gate) * up in the dtype (F.silu(gate) * up rounding); gate, up at row strides ldg, ldu",
        py::arg("gate"), py::arg("ldg"), py::arg("up"), py::arg("ldu"), py::arg("out"), py::arg("R"), py::arg("n"),
        py::arg("dtype"));
  m.def("rms_norm", &jr::rms_norm, release(),
        "out[R, C] = RMSNorm(x (+ residual, also written to h_out)) in the dtype (ops.rms_norm_torch rounding)",
        py::arg("x"), py::arg("ldx"), py::arg("residual"), py::arg("ldr"), py::arg("weight"), py::arg("out"),
        py::arg("h_out"), py::arg("R"), py::arg("C"), py::arg("eps"), py::arg("dtype"));
  m.def("rope", &jr::rope, release(), "out[R, H, D] = rotate-half RoPE of x (ops.rope_torch rounding), fp32 tables",
        py::arg("x"), py::arg("ldx"), py::arg("cos"), py::arg("sin"), py::arg("out"), py::arg("R"), py::arg("H"),
        py::arg("D"), py::arg("dtype"));
  m.def("image_steps", &jr::image_steps, release(), "k decode steps of image rows (cpu_step.ImageStep.steps)",
        py::arg("plan"), py::arg("layers"), py::arg("L"), py::arg("k"), py::arg("tokens"), py::arg("positions"),
        py::arg("lens"), py::arg("slots"), py::arg("block_tables"), py::arg("max_blocks"), py::arg("seeds"),
        py::arg("out"), py::arg("eps"), py::arg("final_eps"), py::arg("sm_scale"), py::arg("layer_stride") = 8);
  m.def("image_steps_plan_len", &jr::image_steps_plan_len, "entries of image_steps' plan");
  m.def("stream_sum", &jr::stream_sum, release(), "sum of n fp32 at read bandwidth (the bench roofline probe)",
        py::arg("x"), py::arg("n"));
  m.def("prefill_attention_available", &jr::prefill_attention_available, "whether this build has prefill_attention");
  m.def("prefill_attention", &jr::prefill_attention, release(), "o = softmax(q k^T * scale) v, bf16 [B, T, H, D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("o"), py::arg("B"), py::arg("Tq"), py::arg("Tk"), py::arg("H"),
        py::arg("Hkv"), py::arg("D"), py::arg("causal"), py::arg("scale"), py::arg("q_sb"), py::arg("q_st"),
        py::arg("k_sb"), py::arg("k_st"), py::arg("v_sb"), py::arg("v_st"));
  m.def("simd_isa", &jr::simd_isa, "vector ISA the kernels were compiled for: avx512, avx2 or scalar");
  m.def("prefetch_rules", &jr::prefetch_rules, "the decode kernels' software-prefetch rules on this CPU");
  m.def("set_thread_team", &jr::set_thread_team, "omp_set_num_threads(n): the calling thread's team only",
        py::arg("n"));
}
