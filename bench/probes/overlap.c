// The traffic of bnorm's fused S5 backward (NCHW 64x128x56x56 f32, two channels per
// task): per task the group's rows of x and dy read once (sums), then read again while dx
// is streamed out. Two questions; two threads; the schedules of each question run
// round-robin (so that the drift of a shared machine hits them alike), 25 rounds after a
// warm-up, best and median of each:
// 1. Can the read phase overlap the write phase? "phases" does one task after another
//    (what bnorm does); "pipelined" reads group g + 1 sample by sample between the sample
//    rows of group g's output, so that reads from memory and streaming writes are in
//    flight at the same time on each core; "phases_pf" is "phases" with the prefetch of
//    question 2 in its first pass.
// 2. How fast can the read phase (the sums alone) go? "reduce" reads each sample's rows
//    in turn (two streams: x, dy); "next_t1" does the same while prefetching (into L2) the
//    same offsets of the next sample's rows, 1.6 MB further (four streams, same
//    arithmetic order); "reduce2" reads two samples at once (four streams, other order).
// Build and run (outside CI):
//   gcc -O2 -mavx512f -mavx2 -mfma -fopenmp overlap.c -o overlap && OMP_NUM_THREADS=2 ./overlap
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N = 64, C = 128, HW = 3136, G = 2, TASKS = C / G, ROUNDS = 25 };
static float *x, *dy, *dx;
static double sums[C][2];

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}
static size_t at(int n, int t) { return ((size_t)n * C + (size_t)t * G) * HW; }

// Pass 1 on sample n of task t: the sums of dy and dy*x over its G rows.
static void reduce(int t, int n, __m512 *a, __m512 *b) {
  const float *xp = x + at(n, t), *dp = dy + at(n, t);
  for (int i = 0; i < G * HW; i += 16) {
    __m512 d = _mm512_loadu_ps(dp + i);
    *a = _mm512_add_ps(*a, d);
    *b = _mm512_fmadd_ps(d, _mm512_loadu_ps(xp + i), *b);
  }
}
// Pass 2 on sample n of task t: dx = k*dy + b*x + c, streamed.
static void map(int t, int n, float k, float b, float c) {
  const float *xp = x + at(n, t), *dp = dy + at(n, t);
  float *op = dx + at(n, t);
  __m512 kk = _mm512_set1_ps(k), bb = _mm512_set1_ps(b), cc = _mm512_set1_ps(c);
  for (int i = 0; i < G * HW; i += 16) {
    __m512 v = _mm512_fmadd_ps(kk, _mm512_loadu_ps(dp + i),
                               _mm512_fmadd_ps(bb, _mm512_loadu_ps(xp + i), cc));
    _mm512_stream_ps(op + i, v);
  }
}
static void finish(int t, __m512 a, __m512 b) {
  sums[t][0] = _mm512_reduce_add_ps(a);
  sums[t][1] = _mm512_reduce_add_ps(b);
}
static float kof(int t) { return 1.0f + (float)(sums[t][0] * 1e-12); }

static void phases(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < TASKS; t++) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) reduce(t, n, &a, &b);
    finish(t, a, b);
    for (int n = 0; n < N; n++) map(t, n, kof(t), 0.5f, 0.25f);
    _mm_sfence();
  }
}

// "phases" with pass 1 prefetching the next sample's rows (what bnorm does since the
// fifth session).
static void reduce_next(int t, int n, __m512 *a, __m512 *b) {
  const float *xp = x + at(n, t), *dp = dy + at(n, t);
  int m = n + 1 < N ? n + 1 : n;
  const float *xq = x + at(m, t), *dq = dy + at(m, t);
  for (int i = 0; i < G * HW; i += 16) {
    _mm_prefetch((const char *)(dq + i), _MM_HINT_T1);
    _mm_prefetch((const char *)(xq + i), _MM_HINT_T1);
    __m512 d = _mm512_loadu_ps(dp + i);
    *a = _mm512_add_ps(*a, d);
    *b = _mm512_fmadd_ps(d, _mm512_loadu_ps(xp + i), *b);
  }
}
static void phases_pf(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < TASKS; t++) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) reduce_next(t, n, &a, &b);
    finish(t, a, b);
    for (int n = 0; n < N; n++) map(t, n, kof(t), 0.5f, 0.25f);
    _mm_sfence();
  }
}

static void pipelined(void) {
#pragma omp parallel
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int t0 = TASKS * id / nt, t1 = TASKS * (id + 1) / nt;
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) reduce(t0, n, &a, &b);
    finish(t0, a, b);
    for (int t = t0; t < t1; t++) {
      a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
      for (int n = 0; n < N; n++) {
        if (t + 1 < t1) reduce(t + 1, n, &a, &b);
        map(t, n, kof(t), 0.5f, 0.25f);
      }
      if (t + 1 < t1) finish(t + 1, a, b);
    }
    _mm_sfence();
  }
}

static void only_reduce(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < TASKS; t++) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) reduce(t, n, &a, &b);
    finish(t, a, b);
  }
}
static void only_reduce_next(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < TASKS; t++) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    for (int n = 0; n < N; n++) reduce_next(t, n, &a, &b);
    finish(t, a, b);
  }
}
static void only_reduce2(void) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int t = 0; t < TASKS; t++) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    __m512 a2 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps();
    for (int n = 0; n < N; n += 2) {
      const float *xp = x + at(n, t), *dp = dy + at(n, t);
      const float *xq = x + at(n + 1, t), *dq = dy + at(n + 1, t);
      for (int i = 0; i < G * HW; i += 16) {
        __m512 d = _mm512_loadu_ps(dp + i), e = _mm512_loadu_ps(dq + i);
        a = _mm512_add_ps(a, d);
        a2 = _mm512_add_ps(a2, e);
        b = _mm512_fmadd_ps(d, _mm512_loadu_ps(xp + i), b);
        b2 = _mm512_fmadd_ps(e, _mm512_loadu_ps(xq + i), b2);
      }
    }
    finish(t, _mm512_add_ps(a, a2), _mm512_add_ps(b, b2));
  }
}

static void copy(void) {
  size_t n = (size_t)N * C * HW, ch = 32768;
#pragma omp parallel for schedule(static)
  for (size_t i = 0; i < n; i += ch) memcpy(dx + i, x + i, (i + ch < n ? ch : n - i) * 4);
}

static int cmp(const void *a, const void *b) {
  double d = *(const double *)a - *(const double *)b;
  return (d > 0) - (d < 0);
}
// Runs the schedules `f` round-robin (so that the machine's drift hits them alike),
// ROUNDS times after one warm-up round, and prints each one's best and median.
static void compare(int k, const char **names, void (**f)(void), double bytes) {
  double t[8][ROUNDS];
  for (int j = 0; j < k; j++) f[j]();
  for (int r = 0; r < ROUNDS; r++)
    for (int j = 0; j < k; j++) {
      double s = now();
      f[j]();
      t[j][r] = now() - s;
    }
  for (int j = 0; j < k; j++) {
    qsort(t[j], ROUNDS, sizeof t[j][0], cmp);
    printf("%-10s best %6.2f ms  median %6.2f ms  (%5.1f GB/s at the median)\n", names[j],
           t[j][0] * 1e3, t[j][ROUNDS / 2] * 1e3, bytes / t[j][ROUNDS / 2] / 1e9);
  }
}

int main(void) {
  size_t n = (size_t)N * C * HW;
  x = aligned_alloc(4096, n * 4), dy = aligned_alloc(4096, n * 4), dx = aligned_alloc(4096, n * 4);
  for (size_t i = 0; i < n; i++) x[i] = (float)(i % 97), dy[i] = (float)(i % 13), dx[i] = 0;
  for (int rep = 0; rep < 3; rep++) {
    const char *whole[] = {"phases", "phases_pf", "pipelined"};
    void (*wf[])(void) = {phases, phases_pf, pipelined};
    compare(3, whole, wf, 3.0 * n * 4);
    const char *read[] = {"reduce", "next_t1", "reduce2"};
    void (*rf[])(void) = {only_reduce, only_reduce_next, only_reduce2};
    compare(3, read, rf, 2.0 * n * 4);
    const char *cp[] = {"copy"};
    void (*cf[])(void) = {copy};
    compare(1, cp, cf, 2.0 * n * 4);
    printf("\n");
  }
  double z = 0;  // keeps the sums (and so the reductions) live
  for (int t = 0; t < C; t++) z += sums[t][0] + sums[t][1];
  printf("(%g)\n", z);
  return 0;
}
