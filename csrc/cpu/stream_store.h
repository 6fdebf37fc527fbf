// Non-temporal ("streaming") stores, for outputs too large to still be in cache when read.
//
// A normal store first reads the destination line into cache (read-for-ownership): for an output
// that leaves the cache before anyone reads it, that read is wasted memory traffic. On this
// project's 2-core AVX-512 machine, out of cache, a 25.7 MB ReLU copy took 1.84 ms with normal
// stores and 1.18 ms streaming, a zero fill 1.35 ms and 0.56 ms; in cache streaming cost ~5 %.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace taskrouting {

#if defined(__AVX512F__)
constexpr int64_t kStreamAlign = 64;
inline void stream_line(char* dst, const char* src) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
inline void stream_zero_line(char* dst) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_setzero_si512());
}
#elif defined(__AVX__)
constexpr int64_t kStreamAlign = 32;
inline void stream_line(char* dst, const char* src) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
inline void stream_zero_line(char* dst) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_setzero_si256());
}
#elif defined(__SSE2__)
constexpr int64_t kStreamAlign = 16;
inline void stream_line(char* dst, const char* src) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
inline void stream_zero_line(char* dst) { _mm_stream_si128(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128()); }
#endif

// Bytes from dst to its next streaming-aligned address (at most `bytes`).
inline int64_t stream_head(const void* dst, int64_t bytes) {
#if defined(__SSE2__)
  const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kStreamAlign);
  return std::min(bytes, misalign ? kStreamAlign - misalign : int64_t(0));
#else
  return bytes;
#endif
}

// memcpy with the aligned middle of dst written by streaming stores.
inline void stream_copy(void* dst_v, const void* src_v, int64_t bytes) {
  char* dst = static_cast<char*>(dst_v);
  const char* src = static_cast<const char*>(src_v);
  const int64_t head = stream_head(dst, bytes);
  std::memcpy(dst, src, head);
  int64_t i = head;
#if defined(__SSE2__)
  for (; i + kStreamAlign <= bytes; i += kStreamAlign) stream_line(dst + i, src + i);
#endif
  std::memcpy(dst + i, src + i, bytes - i);
}

// memset(dst, 0, bytes) with the aligned middle written by streaming stores.
inline void stream_zero(void* dst_v, int64_t bytes) {
  char* dst = static_cast<char*>(dst_v);
  const int64_t head = stream_head(dst, bytes);
  std::memset(dst, 0, head);
  int64_t i = head;
#if defined(__SSE2__)
  for (; i + kStreamAlign <= bytes; i += kStreamAlign) stream_zero_line(dst + i);
#endif
  std::memset(dst + i, 0, bytes - i);
}

// Orders a thread's streaming stores before what it does next (they bypass the usual ordering).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Outputs of at least this many bytes are streamed. Large enough that outputs which the next
// layer can still find in a typical last-level cache are stored normally; overridable (tests
// use 0 to run the streaming path on small tensors) with TASKROUTING_STREAM_MIN_BYTES.
inline int64_t stream_min_bytes() {
  constexpr int64_t kDefault = int64_t(8) << 20;
  const char* env = std::getenv("TASKROUTING_STREAM_MIN_BYTES");
  if (env == nullptr || *env == '\0') return kDefault;
  char* end = nullptr;
  const long long value = std::strtoll(env, &end, 10);
  return (end != nullptr && *end == '\0' && value >= 0) ? static_cast<int64_t>(value) : kDefault;
}

}  // namespace taskrouting
