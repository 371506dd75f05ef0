// Linear layers with bf16 weights and attention over a bf16 KV cache for CPUs with bf16 units, over the oneDNN
// that ships inside Paddle's wheel. A plain C library (llava_ui/model/kernels.py loads it with ctypes): every
// function takes raw pointers to buffers the caller (Python, Paddle tensors) allocated and keeps alive, allocates
// no tensor and touches no Paddle state, so any thread may call any function at any time.
//
// llava_bf16_pack reorders an fp32 weight ONCE into the blocked bf16 layout oneDNN's matmul reads fastest; the
// caller holds the bytes (a uint8 tensor) in place of the fp32 weight. llava_bf16_linear multiplies rows of fp32
// activations by such a weight (activations rounded to bf16, products summed in fp32, fp32 out, + bias). Nothing
// converts a weight again after the pack, whatever the row count or the calling thread. llava_int8_pack and
// llava_int8_linear do the same for weight-only int8 (one scale per output). Attention: one decode position
// (llava_decode_attention, _rows for a batched step) and a prefill chunk (llava_prefill_attention) over a bf16 KV
// cache. llava_decode_step runs a whole decode step of the language model, every layer, as one call per worker.
//
// Every function returns 0, or -1 with the reason in llava_last_error() (a oneDNN error: the caller raises it).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <dlfcn.h>
#include <immintrin.h>
#include <sched.h>

#include "oneapi/dnnl/dnnl.hpp"

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine& cpu() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The layout every packed weight of this shape has: the one the matmul picks for a few rows. Weights are packed
// for decode (one to a few rows); longer inputs read the same layout.
memory::desc packed_desc(int64_t k, int64_t n) {
  static std::mutex lock;
  static std::map<std::pair<int64_t, int64_t>, memory::desc> known;
  std::lock_guard<std::mutex> hold(lock);
  auto found = known.find({k, n});
  if (found != known.end()) return found->second;
  memory::desc src({1, k}, dt::bf16, tag::ab), any({k, n}, dt::bf16, tag::any), dst({1, n}, dt::f32, tag::ab);
  auto pd = dnnl::matmul::primitive_desc(cpu(), src, any, dst);
  return known.emplace(std::make_pair(k, n), pd.weights_desc()).first->second;
}

struct Matmul {
  dnnl::matmul::primitive_desc desc;
  dnnl::matmul primitive;
};

// One primitive per (rows, k, n, threads), made on first use and kept: making one costs more than a decode-size
// product. Several threads may run the same primitive at once (the CPU workers' parts of a layer have equal
// shapes), so its scratchpad is the caller's own (scratchpad_mode::user, one buffer per thread), never shared.
Matmul& matmul_for(int64_t m, int64_t k, int64_t n, int threads) {
  static std::mutex lock;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int>, Matmul> known;
  std::lock_guard<std::mutex> hold(lock);
  auto key = std::make_tuple(m, k, n, threads);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  memory::desc src({m, k}, dt::bf16, tag::ab), dst({m, n}, dt::f32, tag::ab), bias({1, n}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto pd = dnnl::matmul::primitive_desc(cpu(), src, packed_desc(k, n), bias, dst, attr);
  return known.emplace(key, Matmul{pd, dnnl::matmul(pd)}).first->second;
}

// The thread count of the OpenMP runtime the oneDNN inside Paddle runs on (libgomp), asked of that library itself:
// the process also holds Intel's OpenMP (Paddle's MKL), and a plain omp_* call may bind to that one instead, which
// would leave oneDNN's count unchanged (a primitive made for one thread then run by more overflows its scratchpad).
struct Gomp {
  void (*set)(int) = nullptr;
  int (*get)() = nullptr;
  Gomp() {
    void* library = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (library == nullptr) library = dlopen("libgomp.so.1", RTLD_NOW);
    if (library != nullptr) {
      set = reinterpret_cast<void (*)(int)>(dlsym(library, "omp_set_num_threads"));
      get = reinterpret_cast<int (*)()>(dlsym(library, "omp_get_max_threads"));
    }
  }
};

Gomp& gomp() {
  static Gomp runtime;
  return runtime;
}

// Each call runs on the calling thread alone: the engine's CPU workers each take one part of a layer at once, and
// a oneDNN team per worker would put more threads than cores to work.
struct OneThread {
  int previous;
  OneThread() {
    if (gomp().set == nullptr || gomp().get == nullptr)
      throw std::runtime_error("libgomp (the OpenMP of Paddle's oneDNN) not found");
    previous = gomp().get();
    gomp().set(1);
    if (gomp().get() != 1) throw std::runtime_error("could not run oneDNN on one thread");
  }
  ~OneThread() { gomp().set(previous); }
};

inline uint16_t to_bf16(float value) {  // round to nearest even, as oneDNN's own conversion
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

thread_local std::string last_error;

// Runs `body`, turning an exception into -1 and llava_last_error()'s text.
template <typename Body>
int guarded(Body body) {
  try {
    body();
    return 0;
  } catch (const std::exception& err) {
    last_error = err.what();
  } catch (...) {
    last_error = "unknown error";
  }
  return -1;
}

// out [m, n] = x [m, k] rounded to bf16, times `weights` (+ bias [n]) through the primitive make() returns, on the
// calling thread alone (the primitive is made, or found, while oneDNN is set to one thread); `scales`: the int8
// weights' per-output scales.
template <typename Make>
void bf16_rows_matmul(const float* x, int64_t m, int64_t k, Make make, const memory& weights, const float* bias,
                      int64_t n, float* out, const memory* scales = nullptr) {
  thread_local std::vector<uint16_t> rows;
  rows.resize(static_cast<size_t>(m * k));
  for (int64_t i = 0; i < m * k; ++i) rows[i] = to_bf16(x[i]);
  OneThread one;
  Matmul& mm = make();
  dnnl::stream stream(cpu());
  memory src({{m, k}, dt::bf16, tag::ab}, cpu(), rows.data());
  memory b({{1, n}, dt::f32, tag::ab}, cpu(), const_cast<float*>(bias));
  memory dst({{m, n}, dt::f32, tag::ab}, cpu(), out);
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(std::max<size_t>(mm.desc.scratchpad_desc().get_size(), 1));
  memory scratchpad(mm.desc.scratchpad_desc(), cpu(), scratch.data());
  std::unordered_map<int, memory> args = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_BIAS, b},
                                          {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, scratchpad}};
  if (scales != nullptr) args.emplace(DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, *scales);
  mm.primitive.execute(stream, args);
  stream.wait();
}

}  // namespace

extern "C" {

const char* llava_last_error() { return last_error.c_str(); }

// Bytes of a packed [k, n] weight (llava_bf16_pack's output).
int64_t llava_bf16_packed_size(int64_t k, int64_t n) {
  int64_t size = -1;
  guarded([&] { size = static_cast<int64_t>(packed_desc(k, n).get_size()); });
  return size;
}

// weight: fp32 [k, n] rows (transposed = 0) or [n, k] rows (transposed = 1, e.g. a tied head stored as the
// embedding); packed: llava_bf16_packed_size(k, n) bytes.
int llava_bf16_pack(const float* weight, int64_t k, int64_t n, int transposed, uint8_t* packed) {
  return guarded([&] {
    dnnl::stream stream(cpu());
    memory source({{k, n}, dt::f32, transposed ? tag::ba : tag::ab}, cpu(), const_cast<float*>(weight));
    memory target(packed_desc(k, n), cpu(), packed);
    dnnl::reorder(source, target).execute(stream, source, target);
    stream.wait();
  });
}

// out [m, n] = x [m, k] · packed weight [k, n] + bias [n]: x rounded to bf16, products summed in fp32.
int llava_bf16_linear(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* bias, int64_t n,
                      float* out) {
  if (m == 0) return 0;
  return guarded([&] {
    memory weights(packed_desc(k, n), cpu(), const_cast<uint8_t*>(packed));
    bf16_rows_matmul(x, m, k, [&]() -> Matmul& { return matmul_for(m, k, n, 1); }, weights, bias, n, out);
  });
}

}  // extern "C"

// GCC 12's own AVX-512 headers trip -Wmaybe-uninitialized wherever their conversions are inlined (the "undefined"
// pass-through operand): quiet here, down to llava_int8_linear.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// Weight-only int8: a weight [k, n] held as int8 [n, k] (each output's k values side by side) with one fp32 scale
// per output, w[i][j] ~ q[j][i] * scale[j]. A few rows (a decode step) go through int8_gemv below, which reads
// the int8 bytes once for all the rows; more rows (a prefill chunk) through oneDNN's matmul with the weights
// decompressed on the fly (bf16 math), over the same bytes.
const int64_t kGemvRows = 8;  // row counts up to this go through the GEMV

Matmul& int8_matmul_for(int64_t m, int64_t k, int64_t n) {
  static std::mutex lock;
  static std::map<std::tuple<int64_t, int64_t, int64_t>, Matmul> known;
  std::lock_guard<std::mutex> hold(lock);
  auto key = std::make_tuple(m, k, n);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  memory::desc src({m, k}, dt::bf16, tag::ab), weights({k, n}, dt::s8, tag::ba), bias({1, n}, dt::f32, tag::ab),
      dst({m, n}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  attr.set_fpmath_mode(dnnl::fpmath_mode::bf16, true);
  attr.set_scales(DNNL_ARG_WEIGHTS, 1 << 1, {}, dt::f32);
  auto pd = dnnl::matmul::primitive_desc(cpu(), src, weights, bias, dst, attr);
  return known.emplace(key, Matmul{pd, dnnl::matmul(pd)}).first->second;
}

// The rows of a decode step are rounded to int16, each with its own scale (its largest magnitude maps to the
// largest value whose products with int8 weights cannot overflow an int32 sum over k): the products are then exact
// integer sums (AVX-512 VNNI's vpdpwssd: 32 products an instruction, the weights widened once for all the rows),
// so a row's result does not depend on the rows beside it or on the code path.
struct Int16Rows {
  std::vector<int16_t> values;  // [m, k]
  std::vector<float> scales;  // [m]
};

void round_rows(const float* x, int64_t m, int64_t k, Int16Rows& rows) {
  const int64_t pairs = (k + 31) / 32;  // int32 lanes each sum 2 products per 32 inputs
  const double largest = std::min(32767.0, std::floor(2147483647.0 / (127.0 * 2.0 * static_cast<double>(pairs))));
  rows.values.resize(m * k);
  rows.scales.resize(m);
  for (int64_t r = 0; r < m; ++r) {
    float most = 0.0f;
    for (int64_t i = 0; i < k; ++i) most = std::max(most, std::fabs(x[r * k + i]));
    const float step = most > 0.0f ? static_cast<float>(most / largest) : 1.0f;
    rows.scales[r] = step;
    for (int64_t i = 0; i < k; ++i) {
      const float v = std::nearbyint(x[r * k + i] / step);
      rows.values[r * k + i] = static_cast<int16_t>(std::max(-32767.0f, std::min(32767.0f, v)));
    }
  }
}

inline float finish(int64_t sum, float row_scale, float weight_scale, float bias) {
  return static_cast<float>(static_cast<double>(sum) * row_scale * weight_scale) + bias;
}

#ifdef __AVX512BW__
// How far ahead of the products the weight rows are fetched (bytes): one core on its own does not keep enough
// reads in flight over four interleaved streams (bench/results/decode-step-whole-amd.md shows the step's speed).
const int64_t kAhead = 1024;

inline __m512i dot_pairs(__m512i sum, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
  return _mm512_dpwssd_epi32(sum, a, b);
#else
  return _mm512_add_epi32(sum, _mm512_madd_epi16(a, b));
#endif
}

inline int64_t lanes_total(__m512i sum) {  // exact: the 16 int32 lanes added as int64
  const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(sum));
  const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(sum, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
}

// ROWS int16 rows times OUTS outputs' int8 rows, k a multiple of 32; into out[r * n + j]. The loops over rows and
// outputs are unrolled so that the sums stay in registers.
template <int ROWS, int OUTS>
void gemv_block(const int16_t* x, const float* row_scales, int64_t k, const int8_t* q, const float* scale,
                const float* bias, int64_t n, float* out) {
  __m512i sum[ROWS][OUTS];
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < OUTS; ++j) sum[r][j] = _mm512_setzero_si512();
  for (int64_t i = 0; i < k; i += 32) {
    if (i % 64 == 0) {  // each output's row is its own stream: fetched ahead, one cache line per stream at a time
#pragma GCC unroll 4
      for (int j = 0; j < OUTS; ++j) _mm_prefetch(reinterpret_cast<const char*>(q + j * k + i + kAhead), _MM_HINT_T0);
    }
    __m512i w[OUTS];
#pragma GCC unroll 4
    for (int j = 0; j < OUTS; ++j)
      w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j * k + i)));
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r) {
      const __m512i v = _mm512_loadu_si512(x + r * k + i);
#pragma GCC unroll 4
      for (int j = 0; j < OUTS; ++j) sum[r][j] = dot_pairs(sum[r][j], v, w[j]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < OUTS; ++j) out[r * n + j] = finish(lanes_total(sum[r][j]), row_scales[r], scale[j], bias[j]);
}

// ROWS rows times `outs` consecutive outputs (out's rows are n apart).
template <int ROWS>
void gemv_rows(const int16_t* x, const float* row_scales, int64_t k, const int8_t* q, const float* scale,
               const float* bias, int64_t n, float* out, int64_t outs) {
  int64_t j = 0;
  for (; j + 4 <= outs; j += 4) gemv_block<ROWS, 4>(x, row_scales, k, q + j * k, scale + j, bias + j, n, out + j);
  for (; j < outs; ++j) gemv_block<ROWS, 1>(x, row_scales, k, q + j * k, scale + j, bias + j, n, out + j);
}
#endif

// out [m, n] = x [m, k] · (q [n, k] ⊙ scale)ᵀ + bias, m <= kGemvRows, x's rows rounded to int16 (round_rows):
// each block of outputs is read from memory once and used for every row while it is in the cache.
void int8_gemv(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, const float* bias,
               int64_t n, float* out) {
  thread_local Int16Rows rows;
  round_rows(x, m, k, rows);
#ifdef __AVX512BW__
  if (k % 32 == 0) {
    const int64_t block = 64;  // outputs per block: 64 rows of int8 weights stay in the L1/L2 cache across the rows
    for (int64_t j = 0; j < n; j += block) {
      const int64_t outs = std::min(block, n - j);
      for (int64_t r = 0; r < m; r += 4) {
        const int16_t* v = rows.values.data() + r * k;
        const float* s = rows.scales.data() + r;
        float* to = out + r * n + j;
        const int8_t* w = q + j * k;
        switch (std::min<int64_t>(4, m - r)) {
          case 4: gemv_rows<4>(v, s, k, w, scale + j, bias + j, n, to, outs); break;
          case 3: gemv_rows<3>(v, s, k, w, scale + j, bias + j, n, to, outs); break;
          case 2: gemv_rows<2>(v, s, k, w, scale + j, bias + j, n, to, outs); break;
          default: gemv_rows<1>(v, s, k, w, scale + j, bias + j, n, to, outs); break;
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < m; ++r)  // the same integer sums, one product at a time
    for (int64_t j = 0; j < n; ++j) {
      int64_t sum = 0;
      for (int64_t i = 0; i < k; ++i) sum += static_cast<int64_t>(rows.values[r * k + i]) * q[j * k + i];
      out[r * n + j] = finish(sum, rows.scales[r], scale[j], bias[j]);
    }
}

}  // namespace

extern "C" {

// weight: fp32 [k, n] rows (transposed = 0) or [n, k] rows (transposed = 1) → q int8 [n, k] and scale [n]
// (each output's largest magnitude maps to 127; values rounded to nearest).
int llava_int8_pack(const float* weight, int64_t k, int64_t n, int transposed, int8_t* q, float* scale) {
  return guarded([&] {
    for (int64_t j = 0; j < n; ++j) {
      auto at = [&](int64_t i) { return transposed ? weight[j * k + i] : weight[i * n + j]; };
      float most = 0.0f;
      for (int64_t i = 0; i < k; ++i) most = std::max(most, std::fabs(at(i)));
      const float step = most > 0.0f ? most / 127.0f : 1.0f;
      scale[j] = step;
      for (int64_t i = 0; i < k; ++i)
        q[j * k + i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(at(i) / step))));
    }
  });
}

// out [m, n] = x [m, k] · (q [n, k] ⊙ scale)ᵀ + bias [n]: a few rows rounded to int16 and multiplied exactly by
// the int8 values (int8_gemv), more through oneDNN (x rounded to bf16, weights widened to bf16, products summed in
// fp32).
int llava_int8_linear(const float* x, int64_t m, int64_t k, const int8_t* q, const float* scale, const float* bias,
                      int64_t n, float* out) {
  if (m == 0) return 0;
  return guarded([&] {
    if (m <= kGemvRows) {
      int8_gemv(x, m, k, q, scale, bias, n, out);
      return;
    }
    memory weights({{k, n}, dt::s8, tag::ba}, cpu(), const_cast<int8_t*>(q));
    memory scales({{n}, dt::f32, tag::a}, cpu(), const_cast<float*>(scale));
    bf16_rows_matmul(x, m, k, [&]() -> Matmul& { return int8_matmul_for(m, k, n); }, weights, bias, n, out, &scales);
  });
}

}  // extern "C"

#pragma GCC diagnostic pop

// One decode position of one worker's attention heads, after its q|k|v product: RoPE on q (times 1/sqrt(dim)) and
// k, the new k and v written into the cache rows at `position`, then softmax attention of each q head over cache
// positions 0..position of its kv head. One call stands in for the dozen Paddle ops (and their dispatch) this is
// per part and layer. qkv: [(q_heads + 2 kv_heads) * dim]; cos, sin: [dim] for `position`; keys, values:
// [kv_heads * capacity, dim] bf16 bits, head-major (written in place); out: [q_heads * dim].
namespace {

inline float from_bf16(uint16_t bits) {
  uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

inline void rope(const float* x, const float* cos, const float* sin, float scale, int64_t dim, float* y) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    y[i] = (x[i] * cos[i] - x[i + half] * sin[i]) * scale;
    y[i + half] = (x[i + half] * cos[i + half] + x[i] * sin[i + half]) * scale;
  }
}

// exp(x) for x <= 0 to float precision, in a form the compiler vectorises (no libm call in the loop)
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = static_cast<int32_t>(n + 127.0f) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The body of llava_decode_attention (its arguments checked).
void decode(const float* in, const float* c, const float* s, int64_t dim, uint16_t* k_cache, uint16_t* v_cache,
            int64_t q_heads, int64_t kv_heads, int64_t capacity, int64_t position, float* o) {
  std::vector<float> turned(dim);
  for (int64_t h = 0; h < kv_heads; ++h) {
    rope(in + (q_heads + h) * dim, c, s, 1.0f, dim, turned.data());
    uint16_t* k_row = k_cache + (h * capacity + position) * dim;
    uint16_t* v_row = v_cache + (h * capacity + position) * dim;
    const float* v_new = in + (q_heads + kv_heads + h) * dim;
    for (int64_t i = 0; i < dim; ++i) {
      k_row[i] = to_bf16(turned[i]);
      v_row[i] = to_bf16(v_new[i]);
    }
  }
  const int64_t group = q_heads / kv_heads, seen = position + 1;
  std::vector<float> q(dim), weights(seen);
  for (int64_t h = 0; h < q_heads; ++h) {
    rope(in + h * dim, c, s, 1.0f / std::sqrt(static_cast<float>(dim)), dim, q.data());
    const uint16_t* k_head = k_cache + (h / group) * capacity * dim;
    const uint16_t* v_head = v_cache + (h / group) * capacity * dim;
    float top = -INFINITY;
    for (int64_t p = 0; p < seen; ++p) {
      const uint16_t* k = k_head + p * dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < dim; ++i) dot += q[i] * from_bf16(k[i]);
      weights[p] = dot;
      top = std::max(top, dot);
    }
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t p = 0; p < seen; ++p) {  // (no libm call: the loop vectorises, and no denormal comes out)
      weights[p] = exp_nonpositive(weights[p] - top);
      total += weights[p];
    }
    float* row = o + h * dim;
    std::fill(row, row + dim, 0.0f);
    const float norm = 1.0f / total;
    for (int64_t p = 0; p < seen; ++p) {
      const float w = weights[p] * norm;
      const uint16_t* v = v_head + p * dim;
#pragma omp simd
      for (int64_t i = 0; i < dim; ++i) row[i] += w * from_bf16(v[i]);
    }
  }
}

}  // namespace

extern "C" int llava_decode_attention(const float* qkv, const float* cos, const float* sin, int64_t dim,
                                      uint16_t* keys, uint16_t* values, int64_t q_heads, int64_t kv_heads,
                                      int64_t capacity, int64_t position, float* out) {
  if (q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads != 0 || position < 0 || position >= capacity) {
    last_error = "decode_attention: heads or position outside the cache";
    return -1;
  }
  return guarded([&] { decode(qkv, cos, sin, dim, keys, values, q_heads, kv_heads, capacity, position, out); });
}

// llava_decode_attention for `rows` sequences of a batched decode step in one call, each over its own cache
// (keys[r], values[r], capacities[r]) at its own position: qkv [rows, (q_heads + 2 kv_heads) * dim], cos and sin
// [rows, dim], out [rows, q_heads * dim].
extern "C" int llava_decode_attention_rows(const float* qkv, const float* cos, const float* sin, int64_t dim,
                                           int64_t rows, uint16_t* const* keys, uint16_t* const* values,
                                           const int64_t* capacities, const int64_t* positions, int64_t q_heads,
                                           int64_t kv_heads, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    if (llava_decode_attention(qkv + r * (q_heads + 2 * kv_heads) * dim, cos + r * dim, sin + r * dim, dim, keys[r],
                               values[r], q_heads, kv_heads, capacities[r], positions[r], out + r * q_heads * dim))
      return -1;
  }
  return 0;
}

// Causal attention of a prefill chunk for one worker's heads, flash-style: blocks of queries against blocks of
// keys, bf16 products summed in fp32 (oneDNN matmul), a running softmax per query row in fp32, key blocks past a
// query block's last position never computed. heads: [q_heads + 2 kv_heads, rows, dim], q (RoPE applied, times
// 1/sqrt(dim)), k (RoPE applied) and v of the chunk's positions start..start+rows-1; its k and v are written into
// keys, values ([kv_heads * capacity, dim] bf16 bits, holding positions 0..start-1 already); out: [rows, q_heads *
// dim].
namespace {

constexpr int64_t kQueryBlock = 256, kKeyBlock = 512;


// out[m, n] = a[m, k] · b, b given as [k, n] rows (b_rows_are_k) or as [n, k] rows (its transpose); bf16 in,
// fp32 out. Primitives kept per shape.
void bf16_product(const uint16_t* a, const uint16_t* b, float* out, int64_t m, int64_t k, int64_t n,
                  bool b_rows_are_k) {
  static std::mutex lock;
  static std::map<std::tuple<int64_t, int64_t, int64_t, bool>, Matmul> known;
  Matmul* mm;
  {
    std::lock_guard<std::mutex> hold(lock);
    auto key = std::make_tuple(m, k, n, b_rows_are_k);
    auto found = known.find(key);
    if (found == known.end()) {
      memory::desc src({m, k}, dt::bf16, tag::ab), dst({m, n}, dt::f32, tag::ab);
      memory::desc wei({k, n}, dt::bf16, b_rows_are_k ? tag::ab : tag::ba);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      auto pd = dnnl::matmul::primitive_desc(cpu(), src, wei, dst, attr);
      found = known.emplace(key, Matmul{pd, dnnl::matmul(pd)}).first;
    }
    mm = &found->second;
  }
  thread_local std::vector<uint8_t> scratch;
  scratch.resize(std::max<size_t>(mm->desc.scratchpad_desc().get_size(), 1));
  dnnl::stream stream(cpu());
  memory sa({{m, k}, dt::bf16, tag::ab}, cpu(), const_cast<uint16_t*>(a));
  memory sb({{k, n}, dt::bf16, b_rows_are_k ? tag::ab : tag::ba}, cpu(), const_cast<uint16_t*>(b));
  memory so({{m, n}, dt::f32, tag::ab}, cpu(), out);
  memory sp(mm->desc.scratchpad_desc(), cpu(), scratch.data());
  mm->primitive.execute(stream, {{DNNL_ARG_SRC, sa}, {DNNL_ARG_WEIGHTS, sb}, {DNNL_ARG_DST, so},
                                 {DNNL_ARG_SCRATCHPAD, sp}});
  stream.wait();
}

void to_bf16_rows(const float* source, int64_t count, uint16_t* target) {
  for (int64_t i = 0; i < count; ++i) target[i] = to_bf16(source[i]);
}

// The body of llava_prefill_attention (its arguments checked).
void prefill(const float* qs, int64_t q_heads, int64_t kv_heads, int64_t rows, int64_t dim, uint16_t* k_cache,
             uint16_t* v_cache, int64_t capacity, int64_t start, float* o) {
  OneThread one;
  for (int64_t h = 0; h < kv_heads; ++h) {  // the chunk's keys and values into the cache
    to_bf16_rows(qs + (q_heads + h) * rows * dim, rows * dim, k_cache + (h * capacity + start) * dim);
    to_bf16_rows(qs + (q_heads + kv_heads + h) * rows * dim, rows * dim, v_cache + (h * capacity + start) * dim);
  }
  const int64_t group = q_heads / kv_heads;
  std::vector<uint16_t> q16(rows * dim), p16(kQueryBlock * kKeyBlock);
  std::vector<float> scores(kQueryBlock * kKeyBlock), pv(kQueryBlock * dim), acc(kQueryBlock * dim);
  std::vector<float> top(kQueryBlock), total(kQueryBlock);
  for (int64_t h = 0; h < q_heads; ++h) {
    const uint16_t* k16 = k_cache + (h / group) * capacity * dim;
    const uint16_t* v16 = v_cache + (h / group) * capacity * dim;
    to_bf16_rows(qs + h * rows * dim, rows * dim, q16.data());
    for (int64_t r0 = 0; r0 < rows; r0 += kQueryBlock) {
      const int64_t m = std::min(kQueryBlock, rows - r0), last = start + r0 + m;  // keys < last are visible
      std::fill(top.begin(), top.begin() + m, -3.0e38f);
      std::fill(total.begin(), total.begin() + m, 0.0f);
      std::fill(acc.begin(), acc.begin() + m * dim, 0.0f);
      for (int64_t k0 = 0; k0 < last; k0 += kKeyBlock) {
        const int64_t n = std::min(kKeyBlock, last - k0);
        bf16_product(q16.data() + r0 * dim, k16 + k0 * dim, scores.data(), m, dim, n, false);
        for (int64_t i = 0; i < m; ++i) {
          const int64_t seen = std::min(n, start + r0 + i + 1 - k0);  // this row's visible keys in the block
          float* row = scores.data() + i * n;
          uint16_t* p = p16.data() + i * n;
          if (seen <= 0) {
            std::fill(p, p + n, 0);
            continue;
          }
          float block_top = -3.0e38f;
          for (int64_t j = 0; j < seen; ++j) block_top = std::max(block_top, row[j]);
          const float new_top = std::max(top[i], block_top);
          const float correction = exp_nonpositive(top[i] - new_top);
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < seen; ++j) {
            row[j] = exp_nonpositive(row[j] - new_top);
            sum += row[j];
          }
          for (int64_t j = 0; j < seen; ++j) p[j] = to_bf16(row[j]);
          std::fill(p + seen, p + n, 0);
          total[i] = total[i] * correction + sum;
          top[i] = new_top;
          float* a = acc.data() + i * dim;
          for (int64_t d = 0; d < dim; ++d) a[d] *= correction;
        }
        bf16_product(p16.data(), v16 + k0 * dim, pv.data(), m, n, dim, true);
        for (int64_t i = 0; i < m * dim; ++i) acc[i] += pv[i];
      }
      for (int64_t i = 0; i < m; ++i) {
        const float norm = 1.0f / total[i];
        float* target = o + (r0 + i) * q_heads * dim + h * dim;
        for (int64_t d = 0; d < dim; ++d) target[d] = acc[i * dim + d] * norm;
      }
    }
  }
}

}  // namespace

extern "C" int llava_prefill_attention(const float* qs, int64_t q_heads, int64_t kv_heads, int64_t rows,
                                       int64_t dim, uint16_t* k_cache, uint16_t* v_cache, int64_t capacity,
                                       int64_t start, float* o) {
  if (q_heads <= 0 || kv_heads <= 0 || q_heads % kv_heads != 0 || start < 0 || start + rows > capacity) {
    last_error = "prefill_attention: heads or positions outside the cache";
    return -1;
  }
  return guarded([&] { prefill(qs, q_heads, kv_heads, rows, dim, k_cache, v_cache, capacity, start, o); });
}

// A whole decode step of the language model, every layer, for `rows` sequences at once: one call per worker. Each
// worker holds a part of every layer (its attention heads and its slice of the MLP, as Qwen2Runner.pack groups
// them); the workers call llava_decode_step at the same time, each with its part, and meet twice a layer to add
// their parts' outputs (attention, then MLP), which each of them sums in the same order into its own copy of the
// residual stream. Between the meetings nothing returns to Python: the norms, RoPE, the cache writes, attention
// and SwiGLU run here, over the same kernels as the step-by-step path, and at the end each worker's share of the
// LM head writes its columns of the logits.
extern "C" {

struct LlavaLinear {     // a weight as the kernels hold it
  int64_t kind;          // 0: oneDNN's packed bf16 (llava_bf16_pack), 1: int8 with scales (llava_int8_pack)
  const void* data;      // the packed bytes or the int8 values
  const float* scales;   // int8: one per output
  const float* bias;     // n values (zeros where the layer has none)
  int64_t k, n;
};

struct LlavaLayerPart {  // one worker's part of a layer
  LlavaLinear qkv, o, gate_up, down;
};

struct LlavaDecodeModel {  // one worker's view of the language model
  int64_t layers, hidden, dim, q_heads, kv_heads, kv_start, columns;  // its heads (from kv head kv_start), MLP slice
  float eps;
  const LlavaLayerPart* parts;  // [layers]
  const float* const* input_norms;  // [layers]: each layer's RMSNorm weights before attention
  const float* const* post_norms;  // [layers]: before the MLP
  const float* final_norm;
  LlavaLinear head;  // the worker's share of the LM head: vocabulary entries head_start.. (n of them)
  int64_t head_start;
};

struct LlavaDecodeStep {  // what the workers of one step share
  int64_t rows, workers;
  const float* embeds;  // [rows, hidden]
  const float* cos;  // [rows, dim]: each row's RoPE at its position
  const float* sin;
  const int64_t* positions;  // [rows]
  const int64_t* capacities;  // [rows]
  uint16_t* const* keys;  // [rows * layers]: layer l of row r's cache, [kv_heads * capacity, dim] bf16
  uint16_t* const* values;
  float* exchange;  // [2, workers, rows, hidden]: each worker's attention and MLP outputs
  float* logits;  // [rows, vocab]: each worker writes its share's columns
  int64_t vocab;
  int64_t arrived, generation, failed;  // the meeting point (zero before the step)
};

}  // extern "C"

namespace {

void linear(const LlavaLinear& w, const float* x, int64_t m, float* out) {
  if (w.kind != 0 && w.kind != 1) throw std::runtime_error("decode step: unknown weight kind");
  const int status = w.kind == 0
      ? llava_bf16_linear(x, m, w.k, static_cast<const uint8_t*>(w.data), w.bias, w.n, out)
      : llava_int8_linear(x, m, w.k, static_cast<const int8_t*>(w.data), w.scales, w.bias, w.n, out);
  if (status != 0) throw std::runtime_error(last_error);
}

// Waits until every worker of the step has arrived; gives up (throws) when another one failed.
void meet(LlavaDecodeStep* step) {
  const int64_t generation = __atomic_load_n(&step->generation, __ATOMIC_ACQUIRE);
  if (__atomic_add_fetch(&step->arrived, 1, __ATOMIC_ACQ_REL) == step->workers) {
    __atomic_store_n(&step->arrived, 0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&step->generation, 1, __ATOMIC_RELEASE);
    return;
  }
  for (int64_t spins = 0; __atomic_load_n(&step->generation, __ATOMIC_ACQUIRE) == generation; ++spins) {
    if (__atomic_load_n(&step->failed, __ATOMIC_ACQUIRE)) throw std::runtime_error("another worker failed");
    if (spins < 100000) {
      _mm_pause();
    } else {
      sched_yield();  // the other worker is not running: let it
    }
  }
}

// x += the workers' outputs (summed in worker order, then added, as add_n then the residual add), then
// normed = RMSNorm(x) * weight, for every row.
void add_and_norm(const LlavaDecodeStep* step, const float* outputs, int64_t hidden, const float* weight, float eps,
                  float* x, float* normed) {
  const int64_t rows = step->rows;
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * hidden;
    if (outputs != nullptr) {
      for (int64_t i = 0; i < hidden; ++i) {
        float sum = outputs[r * hidden + i];
        for (int64_t w = 1; w < step->workers; ++w) sum += outputs[(w * rows + r) * hidden + i];
        row[i] = sum + row[i];
      }
    }
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) squares += row[i] * row[i];
    const float scale = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
    for (int64_t i = 0; i < hidden; ++i) normed[r * hidden + i] = row[i] * scale * weight[i];
  }
}

void decode_step(const LlavaDecodeModel& model, LlavaDecodeStep* step, int64_t worker) {
  const int64_t rows = step->rows, hidden = model.hidden, dim = model.dim;
  const int64_t qkv_width = (model.q_heads + 2 * model.kv_heads) * dim;
  thread_local std::vector<float> x, normed, qkv, heads, gate_up, act, share;
  x.assign(step->embeds, step->embeds + rows * hidden);
  normed.resize(rows * hidden);
  qkv.resize(rows * qkv_width);
  heads.resize(rows * model.q_heads * dim);
  gate_up.resize(rows * 2 * model.columns);
  act.resize(rows * model.columns);
  std::vector<uint16_t*> keys(rows), values(rows);
  float* attention_out = step->exchange + worker * rows * hidden;
  float* mlp_out = step->exchange + (step->workers + worker) * rows * hidden;
  add_and_norm(step, nullptr, hidden, model.input_norms[0], model.eps, x.data(), normed.data());
  for (int64_t l = 0; l < model.layers; ++l) {
    const LlavaLayerPart& part = model.parts[l];
    linear(part.qkv, normed.data(), rows, qkv.data());
    for (int64_t r = 0; r < rows; ++r) {  // this worker's kv heads of row r's cache
      const int64_t offset = model.kv_start * step->capacities[r] * dim;
      keys[r] = step->keys[r * model.layers + l] + offset;
      values[r] = step->values[r * model.layers + l] + offset;
    }
    if (llava_decode_attention_rows(qkv.data(), step->cos, step->sin, dim, rows, keys.data(), values.data(),
                                    step->capacities, step->positions, model.q_heads, model.kv_heads,
                                    heads.data()) != 0)
      throw std::runtime_error(last_error);
    linear(part.o, heads.data(), rows, attention_out);
    meet(step);
    add_and_norm(step, step->exchange, hidden, model.post_norms[l], model.eps, x.data(), normed.data());
    linear(part.gate_up, normed.data(), rows, gate_up.data());
    const int64_t c = model.columns;
    for (int64_t r = 0; r < rows; ++r)  // SwiGLU: silu(gate) * up, the part's gate columns then its up columns
      for (int64_t i = 0; i < c; ++i) {
        const float g = gate_up[r * 2 * c + i];
        act[r * c + i] = g / (1.0f + std::exp(-g)) * gate_up[r * 2 * c + c + i];
      }
    linear(part.down, act.data(), rows, mlp_out);
    meet(step);
    // (the attention outputs were read before this meeting: the next layer may write them again)
    const float* next = l + 1 < model.layers ? model.input_norms[l + 1] : model.final_norm;
    add_and_norm(step, step->exchange + step->workers * rows * hidden, hidden, next, model.eps, x.data(),
                 normed.data());
  }
  const LlavaLinear& head = model.head;  // the last layer's output, normed, through this worker's share of the head
  if (head.k != hidden || model.head_start < 0 || model.head_start + head.n > step->vocab)
    throw std::runtime_error("decode step: the head's share does not fit the vocabulary");
  share.resize(rows * head.n);
  linear(head, normed.data(), rows, share.data());
  for (int64_t r = 0; r < rows; ++r)
    std::copy(share.begin() + r * head.n, share.begin() + (r + 1) * head.n,
              step->logits + r * step->vocab + model.head_start);
}

}  // namespace

extern "C" int llava_decode_step(const LlavaDecodeModel* model, LlavaDecodeStep* step, int64_t worker) {
  const int status = guarded([&] { decode_step(*model, step, worker); });
  if (status != 0) __atomic_store_n(&step->failed, 1, __ATOMIC_RELEASE);  // the other workers stop waiting
  return status;
}
