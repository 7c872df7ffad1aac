// janus_rt._C: declarations and PYBIND11_MODULE only; one .cpp per op holds the implementation.
// Every function takes raw data pointers (tensor.data_ptr()) and sizes; janus_rt/cpu_ops.py is the only caller
// and checks dtypes, contiguity, devices and shapes first. Sizes are guarded again here (std::invalid_argument ->
// ValueError). dtype codes: 0 = fp32, 1 = bf16 (passed as uint16 bits).
#include <cstdint>

#include <pybind11/pybind11.h>

namespace py = pybind11;
using ptr_t = std::uintptr_t;

namespace jr {
void vq_nearest(ptr_t z, ptr_t codebook, ptr_t out, int64_t N, int64_t K, int64_t D);
void paged_decode_attention(ptr_t q, int q_dtype, ptr_t k_cache, ptr_t v_cache, int kv_dtype, ptr_t block_tables,
                            ptr_t context_lens, ptr_t o, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            int64_t num_blocks, int64_t block_size, int64_t max_blocks, double sm_scale);
void kv_store(ptr_t k, ptr_t v, ptr_t k_cache, ptr_t v_cache, ptr_t slot_mapping, int64_t N, int64_t row_elems,
              int64_t elem_size, int64_t num_slots);
void cfg_sample(ptr_t cond, ptr_t uncond, ptr_t cfg_weight, ptr_t temperature, ptr_t top_k, ptr_t top_p,
                ptr_t seeds, ptr_t greedy, ptr_t out, int64_t B, int64_t V, int64_t ldc, int64_t ldu, ptr_t cond_rows,
                ptr_t uncond_rows, int64_t rows);
void linear(ptr_t x, int x_dtype, ptr_t w, int w_dtype, ptr_t bias, ptr_t y, int64_t M, int64_t N, int64_t K);
void decode_layer(ptr_t h, int dtype, ptr_t in_norm, ptr_t qkv, ptr_t o, ptr_t post_norm, ptr_t gate_up, ptr_t down,
                  ptr_t k_cache, ptr_t v_cache, ptr_t slot_mapping, ptr_t block_tables, ptr_t context_lens, ptr_t cos,
                  ptr_t sin, int64_t R, int64_t C, int64_t H, int64_t I, int64_t num_blocks, int64_t block_size,
                  int64_t max_blocks, double eps, double sm_scale, ptr_t final_norm, ptr_t out, double final_eps,
                  bool packed);
void decode_phase_timing(bool on);
int decode_phase_count();
const char* decode_phase_name(int i);
int64_t decode_phase_read(ptr_t seconds, bool reset);
void mlp_gelu(ptr_t x, ptr_t w1, ptr_t b1, ptr_t w2, ptr_t b2, ptr_t y, int dtype, int64_t M, int64_t K, int64_t H,
              int64_t N, bool packed, bool round_out);
void gather_rows(ptr_t src, int src_dtype, ptr_t idx, ptr_t dst, int dst_dtype, int64_t n, int64_t cols,
                 int64_t src_rows);
bool packed_available(int dtype);
int64_t packed_size(int64_t N, int64_t K, int dtype);
void pack_weight(ptr_t w, ptr_t wp, int64_t N, int64_t K, int dtype);
void linear_packed(ptr_t x, ptr_t wp, ptr_t bias, ptr_t y, int64_t M, int64_t N, int64_t K, int dtype);
void swiglu(ptr_t gate, ptr_t up, ptr_t out, int64_t n, int dtype);
void image_steps(ptr_t plan, ptr_t layers, int64_t L, int64_t k, ptr_t tokens, ptr_t positions, ptr_t lens, ptr_t slots,
                 ptr_t block_tables, int64_t max_blocks, ptr_t seeds, ptr_t out, double eps, double final_eps,
                 double sm_scale);
int64_t image_steps_plan_len();
double stream_sum(ptr_t x, int64_t n);
const char* simd_isa();
}  // namespace jr

PYBIND11_MODULE(_C, m) {
  m.doc() = "janus_rt CPU kernels (OpenMP); call through janus_rt.cpu_ops";
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("vq_nearest", &jr::vq_nearest, release(), "out[N] = argmin_j ||z_i - codebook_j||^2",
        py::arg("z"), py::arg("codebook"), py::arg("out"), py::arg("N"), py::arg("K"), py::arg("D"));
  m.def("paged_decode_attention", &jr::paged_decode_attention, release(), "o = softmax(q k^T * scale) v, paged KV",
        py::arg("q"), py::arg("q_dtype"), py::arg("k_cache"), py::arg("v_cache"), py::arg("kv_dtype"),
        py::arg("block_tables"), py::arg("context_lens"), py::arg("o"), py::arg("B"), py::arg("H"), py::arg("Hkv"),
        py::arg("D"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"), py::arg("sm_scale"));
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
        py::arg("packed"));
  m.def("decode_phase_timing", &jr::decode_phase_timing, "time decode_layer's phases (thread 0, after each barrier)",
        py::arg("on"));
  m.def("decode_phase_count", &jr::decode_phase_count, "number of decode_layer phases");
  m.def("decode_phase_name", &jr::decode_phase_name, "name of decode_layer phase i", py::arg("i"));
  m.def("decode_phase_read", &jr::decode_phase_read, "seconds[phases] = accumulated phase times -> timed calls",
        py::arg("seconds"), py::arg("reset"));
  m.def("packed_available", &jr::packed_available, "whether this build has the packed GEMV for this dtype",
        py::arg("dtype"));
  m.def("packed_size", &jr::packed_size, "elements of a packed [N, K] weight", py::arg("N"), py::arg("K"),
        py::arg("dtype"));
  m.def("pack_weight", &jr::pack_weight, release(), "wp = W [N, K] in the packed GEMV's strip layout",
        py::arg("w"), py::arg("wp"), py::arg("N"), py::arg("K"), py::arg("dtype"));
  m.def("linear_packed", &jr::linear_packed, release(), "y[M, N] = x[M, K] @ W^T (+ bias), W packed, x in W's dtype",
        py::arg("x"), py::arg("wp"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"),
        py::arg("dtype"));
  m.def("mlp_gelu", &jr::mlp_gelu, release(), "Linear -> GELU(erf) -> Linear for decode-sized x, fp32 output",
        py::arg("x"), py::arg("w1"), py::arg("b1"), py::arg("w2"), py::arg("b2"), py::arg("y"), py::arg("dtype"),
        py::arg("M"), py::arg("K"), py::arg("H"), py::arg("N"), py::arg("packed"), py::arg("round_out") = false);
  m.def("gather_rows", &jr::gather_rows, release(), "dst[i] = src[idx[i]] (rows), converted to dst's dtype",
        py::arg("src"), py::arg("src_dtype"), py::arg("idx"), py::arg("dst"), py::arg("dst_dtype"), py::arg("n"),
        py::arg("cols"), py::arg("src_rows"));
  m.def("swiglu", &jr::swiglu, release(), "out[n] = silu(gate) * up in the dtype (F.silu(gate) * up rounding)",
        py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("n"), py::arg("dtype"));
  m.def("image_steps", &jr::image_steps, release(), "k decode steps of image rows (cpu_ops.ImageStep.steps)",
        py::arg("plan"), py::arg("layers"), py::arg("L"), py::arg("k"), py::arg("tokens"), py::arg("positions"),
        py::arg("lens"), py::arg("slots"), py::arg("block_tables"), py::arg("max_blocks"), py::arg("seeds"),
        py::arg("out"), py::arg("eps"), py::arg("final_eps"), py::arg("sm_scale"));
  m.def("image_steps_plan_len", &jr::image_steps_plan_len, "entries of image_steps' plan");
  m.def("stream_sum", &jr::stream_sum, release(), "sum of n fp32 at read bandwidth (the bench roofline probe)",
        py::arg("x"), py::arg("n"));
  m.def("simd_isa", &jr::simd_isa, "vector ISA the kernels were compiled for: avx512, avx2 or scalar");
}
