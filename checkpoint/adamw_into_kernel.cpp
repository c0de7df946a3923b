// torch's fused CPU AdamW (float32, decoupled weight decay), with the results written to other tensors.
//
// Why by hand: torch's _fused_adamw_ only updates in place, so keeping the previous version intact while the
// new one is written costs a copy of the whole state every step. This kernel reads the old parameter and moments
// and writes the new ones elsewhere (the next snapshot's slot) in the same single pass; with streaming stores
// its memory traffic is that of the in-place kernel.
//
// Bit-identical to torch 2.13's kernel on CPUs where torch runs its AVX-512 or AVX2 code: the same float
// operations in the same order, including where torch's compiled code fuses a multiply and an add (checked at
// load time against torch itself, see checkpoint/fused_adamw_into.py; on a mismatch the caller falls back to a
// copy). Each operation is correctly rounded lane by lane, so the 16-lane, 8-lane and scalar paths agree; the
// vector paths matter for speed only (the scalar loop is ~3x slower than torch's in-place step).
// Per element, with w = 1 - beta1, c2 = 1 - beta2 (all float):
//   m' = fma(w, g - m, m)                      (torch's lerp; fma(w - 1, g - m, g) when |w| >= 0.5)
//   v' = fma(c2 * g, g, v * beta2)             elements up to the tensor's last multiple of 8
//   v' = fma(v, beta2, (c2 * g) * g)           the last numel % 8 elements (torch's scalar remainder)
//   p' = p * (1 - lr * wd) + ((-step_size * m') / (sqrt(v') / sqrt(bias_correction2) + eps))
// Compiled without contraction (-ffp-contract=off): every fma above is explicit.
// The work is split with at::parallel_for, compiled against the OpenMP runtime torch itself loaded: it runs on
// the threads torch's own kernels use, as torch's in-place step does. (A thread started per call cost more than
// its start: its stack was handed back at exit, which flushed the other core's TLB and zeroed fresh pages the
// next call, while the training thread on that core was interrupted.)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <immintrin.h>

#include <ATen/Parallel.h>

namespace {

struct Coefficients {
  float w, w_minus_one, beta2, c2, bc2_sqrt, eps, neg_step_size, decay;
  bool small_weight, has_decay;
};

struct Tensor {
  const float *p, *m, *v, *g;
  float *p_out, *m_out, *v_out;
  int64_t numel;
  Coefficients k;
};

inline void element(const Tensor& t, int64_t i, bool remainder) {
  const Coefficients& k = t.k;
  float p = t.p[i], g = t.g[i], m = t.m[i], v = t.v[i];
  m = k.small_weight ? std::fma(k.w, g - m, m) : std::fma(k.w_minus_one, g - m, g);
  v = remainder ? std::fma(v, k.beta2, (k.c2 * g) * g) : std::fma(k.c2 * g, g, v * k.beta2);
  float step = (k.neg_step_size * m) / (std::sqrt(v) / k.bc2_sqrt + k.eps);
  if (k.has_decay) p = p * k.decay;
  t.p_out[i] = p + step;
  t.m_out[i] = m;
  t.v_out[i] = v;
}

__attribute__((target("avx512f"))) void blocks_avx512(const Tensor& t, int64_t begin, int64_t end) {
  const Coefficients& k = t.k;
  const __m512 w = _mm512_set1_ps(k.small_weight ? k.w : k.w_minus_one), beta2 = _mm512_set1_ps(k.beta2),
               c2 = _mm512_set1_ps(k.c2), bc2_sqrt = _mm512_set1_ps(k.bc2_sqrt), eps = _mm512_set1_ps(k.eps),
               neg_step_size = _mm512_set1_ps(k.neg_step_size), decay = _mm512_set1_ps(k.decay);
  const bool streaming = t.p_out != t.p && t.m_out != t.m && t.v_out != t.v &&
                         (reinterpret_cast<uintptr_t>(t.p_out) | reinterpret_cast<uintptr_t>(t.m_out) |
                          reinterpret_cast<uintptr_t>(t.v_out)) % 64 == 0;
  for (int64_t i = begin; i < end; i += 16) {
    __m512 p = _mm512_loadu_ps(t.p + i), g = _mm512_loadu_ps(t.g + i), m = _mm512_loadu_ps(t.m + i),
           v = _mm512_loadu_ps(t.v + i);
    m = _mm512_fmadd_ps(w, _mm512_sub_ps(g, m), k.small_weight ? m : g);
    v = _mm512_fmadd_ps(_mm512_mul_ps(c2, g), g, _mm512_mul_ps(v, beta2));
    __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), bc2_sqrt), eps);
    __m512 step = _mm512_div_ps(_mm512_mul_ps(neg_step_size, m), denom);
    if (k.has_decay) p = _mm512_mul_ps(p, decay);
    p = _mm512_add_ps(p, step);
    if (streaming) {  // the new version is not read again this step: do not pull its lines into the cache
      _mm512_stream_ps(t.p_out + i, p);
      _mm512_stream_ps(t.m_out + i, m);
      _mm512_stream_ps(t.v_out + i, v);
    } else {
      _mm512_storeu_ps(t.p_out + i, p);
      _mm512_storeu_ps(t.m_out + i, m);
      _mm512_storeu_ps(t.v_out + i, v);
    }
  }
  _mm_sfence();  // streaming stores are weakly ordered: done before the version is published
}

// The same as blocks_avx512 with 8 lanes (CPUs without AVX-512; torch's AVX2 level implies FMA too).
__attribute__((target("avx2,fma"))) void blocks_avx2(const Tensor& t, int64_t begin, int64_t end) {
  const Coefficients& k = t.k;
  const __m256 w = _mm256_set1_ps(k.small_weight ? k.w : k.w_minus_one), beta2 = _mm256_set1_ps(k.beta2),
               c2 = _mm256_set1_ps(k.c2), bc2_sqrt = _mm256_set1_ps(k.bc2_sqrt), eps = _mm256_set1_ps(k.eps),
               neg_step_size = _mm256_set1_ps(k.neg_step_size), decay = _mm256_set1_ps(k.decay);
  const bool streaming = t.p_out != t.p && t.m_out != t.m && t.v_out != t.v &&
                         (reinterpret_cast<uintptr_t>(t.p_out) | reinterpret_cast<uintptr_t>(t.m_out) |
                          reinterpret_cast<uintptr_t>(t.v_out)) % 32 == 0;
  for (int64_t i = begin; i < end; i += 8) {
    __m256 p = _mm256_loadu_ps(t.p + i), g = _mm256_loadu_ps(t.g + i), m = _mm256_loadu_ps(t.m + i),
           v = _mm256_loadu_ps(t.v + i);
    m = _mm256_fmadd_ps(w, _mm256_sub_ps(g, m), k.small_weight ? m : g);
    v = _mm256_fmadd_ps(_mm256_mul_ps(c2, g), g, _mm256_mul_ps(v, beta2));
    __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2_sqrt), eps);
    __m256 step = _mm256_div_ps(_mm256_mul_ps(neg_step_size, m), denom);
    if (k.has_decay) p = _mm256_mul_ps(p, decay);
    p = _mm256_add_ps(p, step);
    if (streaming) {
      _mm256_stream_ps(t.p_out + i, p);
      _mm256_stream_ps(t.m_out + i, m);
      _mm256_stream_ps(t.v_out + i, v);
    } else {
      _mm256_storeu_ps(t.p_out + i, p);
      _mm256_storeu_ps(t.m_out + i, m);
      _mm256_storeu_ps(t.v_out + i, v);
    }
  }
  _mm_sfence();
}

constexpr int64_t kGrainBlocks = 2048;  // fewer blocks than this run on the calling thread alone

struct Work {
  const Tensor* tensors;
  int64_t count, first_block, last_block;  // blocks of 16 elements, numbered across all tensors
  int lanes;  // 16: AVX-512, 8: AVX2 with FMA, else the scalar loop only
};

void run(const Work& work) {
  int64_t block = 0;
  for (int64_t n = 0; n < work.count && block < work.last_block; ++n) {
    const Tensor& t = work.tensors[n];
    int64_t blocks = (t.numel + 15) / 16;
    int64_t lo = std::max(work.first_block, block) - block, hi = std::min(work.last_block, block + blocks) - block;
    block += blocks;
    if (lo >= hi) continue;
    int64_t begin = lo * 16, end = std::min(hi * 16, t.numel);
    if (work.lanes == 16 || work.lanes == 8) {  // begin is a multiple of 16: whole vectors up to vector_end
      int64_t vector_end = std::min(end, t.numel - t.numel % work.lanes);
      if (begin < vector_end) {
        (work.lanes == 16 ? blocks_avx512 : blocks_avx2)(t, begin, vector_end);
        begin = vector_end;
      }
    }
    int64_t remainder_start = t.numel - t.numel % 8;
    for (int64_t i = begin; i < end; ++i) element(t, i, i >= remainder_start);
  }
}

}  // namespace

extern "C" {

// One AdamW step of `count` tensors of a parameter group; tensor n reads p[n], m[n], v[n], g[n] and writes
// p_out[n], m_out[n], v_out[n] (which may be the same memory: the in-place step). steps[n] is its step count
// after the increment, as torch's state["step"] holds it.
void orchestrate_adamw_into(int64_t count, const float* const* p, const float* const* m, const float* const* v,
                           const float* const* g, float* const* p_out, float* const* m_out, float* const* v_out,
                           const int64_t* numel, const double* steps, double lr, double beta1, double beta2,
                           double eps, double weight_decay, int lanes) {
  if (count <= 0) return;
  Tensor* tensors = new Tensor[count];
  int64_t blocks = 0;
  for (int64_t n = 0; n < count; ++n) {
    // as torch: coefficients in double, cast to float where the vector code takes them
    double bias_correction1 = 1 - std::pow(beta1, steps[n]);
    double bias_correction2 = 1 - std::pow(beta2, steps[n]);
    float w = static_cast<float>(1 - beta1);
    Coefficients k{w, w - 1.0f, static_cast<float>(beta2), static_cast<float>(1 - beta2),
                   static_cast<float>(std::sqrt(bias_correction2)), static_cast<float>(eps),
                   static_cast<float>(-(lr / bias_correction1)), static_cast<float>(1 - lr * weight_decay),
                   std::fabs(w) < 0.5f, weight_decay != 0};
    tensors[n] = Tensor{p[n], m[n], v[n], g[n], p_out[n], m_out[n], v_out[n], numel[n], k};
    blocks += (numel[n] + 15) / 16;
  }
  at::parallel_for(0, blocks, kGrainBlocks, [&](int64_t first, int64_t last) {
    run(Work{tensors, count, first, last, lanes});
  });
  delete[] tensors;
}
}
