// The one Python module of the native kernels: every exported function, declared in common.h.
#include "common.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("qmm", torch::wrap_pybind_function(qmm), "qmm");
    m.def("qmm_q8", torch::wrap_pybind_function(qmm_q8), "qmm_q8");
    m.def("qmm_experts", torch::wrap_pybind_function(qmm_experts), "qmm_experts");
    m.def("quantize_activations", torch::wrap_pybind_function(quantize_activations), "quantize_activations");
    m.def("rms_norm", torch::wrap_pybind_function(rms_norm), "rms_norm");
    m.def("set_row_kernels", &set_row_kernels, "set_row_kernels");
    m.def("row_kernels", &row_kernels, "row_kernels");
    m.def("bf16mm", torch::wrap_pybind_function(bf16mm), "bf16mm");
    m.def("dequantize_bf16", torch::wrap_pybind_function(dequantize_bf16), "dequantize_bf16");
    m.def("matrix_engine_gemm", &matrix_engine_gemm, "matrix_engine_gemm");
    m.def("mm_bf16_f32", torch::wrap_pybind_function(mm_bf16_f32), "mm_bf16_f32");
    m.def("engine_mm_grouped", torch::wrap_pybind_function(engine_mm_grouped), "engine_mm_grouped");
    m.def("engine_mm_grouped_bf16", torch::wrap_pybind_function(engine_mm_grouped_bf16), "engine_mm_grouped_bf16");
    m.def("amx_int8_ready", &amx_int8_ready, "amx_int8_ready");
    m.def("amx_bf16_ready", &amx_bf16_ready, "amx_bf16_ready");
    m.def("amx_bf16_grouped", torch::wrap_pybind_function(amx_bf16_grouped), "amx_bf16_grouped");
    m.def("amx_mm_grouped", torch::wrap_pybind_function(amx_mm_grouped), "amx_mm_grouped");
    m.def("amx_mm_gathered", torch::wrap_pybind_function(amx_mm_gathered), "amx_mm_gathered");
    m.def("attend_small", torch::wrap_pybind_function(attend_small), "attend_small");
    m.def("prefill_attention", torch::wrap_pybind_function(prefill_attention), "prefill_attention");
    m.def("rope", torch::wrap_pybind_function(rope), "rope");
    m.def("attn_in", torch::wrap_pybind_function(attn_in), "attn_in");
    m.def("attn_out", torch::wrap_pybind_function(attn_out), "attn_out");
    m.def("mlp_block", torch::wrap_pybind_function(mlp_block), "mlp_block");
    m.def("put_tokens", torch::wrap_pybind_function(put_tokens), "put_tokens");
    m.def("gguf_q4_k", torch::wrap_pybind_function(gguf_q4_k), "gguf_q4_k");
    m.def("gguf_q6_k", torch::wrap_pybind_function(gguf_q6_k), "gguf_q6_k");
}
