/*
 * Calling the llada kernels from C99 through the C ABI (llada/llada.h), on CPU buffers.
 *
 * Runs masked cross-entropy forward, attention forward and one remask step on small random
 * inputs, checks each result against the plain double-precision loops below, and checks the
 * error contract: the runtime version matches the header, a null pointer or a bad dtype gives
 * the documented status and a non-empty llada_last_error(). Exit code 0 only when every check
 * passes, so the program doubles as a test (python_tests/test_embedding.py runs it).
 *
 * Build against an installed package:   cmake -S examples/c -B build-c \
 *                                          -DCMAKE_PREFIX_PATH=<prefix> && cmake --build build-c
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <llada/llada.h>

static int g_failures = 0;

#define EXPECT(cond, ...)                                  \
  do {                                                     \
    if (!(cond)) {                                         \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      fprintf(stderr, __VA_ARGS__);                        \
      fprintf(stderr, "\n");                               \
      ++g_failures;                                        \
    }                                                      \
  } while (0)

/* A status that must be LLADA_OK; prints the library's message otherwise. */
static int ok(llada_status s, const char* what) {
  if (s != LLADA_OK) {
    fprintf(stderr, "FAIL %s: %s: %s\n", what, llada_status_string(s), llada_last_error());
    ++g_failures;
    return 0;
  }
  return 1;
}

/* Deterministic uniform numbers in [lo, hi) (xorshift64*), so every run sees the same data. */
static unsigned long long g_rng = 0x9E3779B97F4A7C15ull;
static double uniform(double lo, double hi) {
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return lo + (hi - lo) * (double)((g_rng * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

/* A view of a dense row-major buffer; `row_pad` extra elements between rows of the first
 * dimension exercise non-contiguous (strided) rows, which the ABI allows. */
static llada_tensor view(void* data, llada_dtype dtype, int ndim, const int64_t* shape,
                         int64_t row_pad) {
  llada_tensor t;
  int i;
  memset(&t, 0, sizeof(t));
  t.data = data;
  t.dtype = dtype;
  t.device_type = LLADA_CPU;
  t.device_id = 0;
  t.ndim = ndim;
  for (i = 0; i < ndim; ++i) t.shape[i] = shape[i];
  if (ndim > 0) {
    t.strides[ndim - 1] = 1;
    for (i = ndim - 2; i >= 0; --i) t.strides[i] = t.strides[i + 1] * shape[i + 1];
    if (ndim > 1) t.strides[0] += row_pad;
  }
  return t;
}

static int close_to(double got, double want, double atol, double rtol) {
  if (isinf(want) || isinf(got)) return got == want;
  return fabs(got - want) <= atol + rtol * fabs(want);
}

/* ---- masked cross-entropy ----------------------------------------------------------------- */
static void check_masked_ce(void) {
  enum { N = 7, V = 13, PAD = 3, LD = V + PAD };
  float logits[N * LD];
  int64_t targets[N];
  float weights[N], loss[N], lse[N];
  int64_t shape2[2] = {N, V}, shape1[1] = {N};
  llada_tensor tl, tt, tw, tloss, tlse;
  int i, j;

  for (i = 0; i < N * LD; ++i) logits[i] = (float)uniform(-4.0, 4.0);
  for (i = 0; i < N; ++i) {
    targets[i] = (int64_t)(uniform(0.0, V));
    /* Rows 1 and 4 are "unmasked" tokens: weight 0, never read, loss 0. */
    weights[i] = (i == 1 || i == 4) ? 0.0f : (float)uniform(0.5, 3.0);
    loss[i] = lse[i] = -12345.0f;
  }
  tl = view(logits, LLADA_FLOAT32, 2, shape2, PAD);
  tt = view(targets, LLADA_INT64, 1, shape1, 0);
  tw = view(weights, LLADA_FLOAT32, 1, shape1, 0);
  tloss = view(loss, LLADA_FLOAT32, 1, shape1, 0);
  tlse = view(lse, LLADA_FLOAT32, 1, shape1, 0);
  if (!ok(llada_masked_ce_fwd(&tl, &tt, &tw, &tloss, &tlse, NULL), "llada_masked_ce_fwd")) return;
  EXPECT(strcmp(llada_last_error(), "") == 0, "a successful call leaves an empty error message");

  for (i = 0; i < N; ++i) {
    const float* row = logits + i * LD;
    double m = row[0], s = 0.0, ref_lse, ref_loss;
    for (j = 1; j < V; ++j) m = row[j] > m ? row[j] : m;
    for (j = 0; j < V; ++j) s += exp((double)row[j] - m);
    ref_lse = m + log(s);
    ref_loss = weights[i] == 0.0f ? 0.0 : weights[i] * (ref_lse - row[targets[i]]);
    EXPECT(close_to(loss[i], ref_loss, 1e-5, 1e-5), "masked CE row %d: loss %.7g, expected %.7g", i,
           loss[i], ref_loss);
    if (weights[i] != 0.0f)
      EXPECT(close_to(lse[i], ref_lse, 1e-5, 1e-5), "masked CE row %d: lse %.7g, expected %.7g", i,
             lse[i], ref_lse);
  }
  printf("masked CE forward: ok\n");
}

/* ---- attention ---------------------------------------------------------------------------- */
static void check_attention(void) {
  enum { B = 2, SQ = 5, SK = 7, HQ = 4, HKV = 2, D = 8 };
  static float q[B * SQ * HQ * D], k[B * SK * HKV * D], v[B * SK * HKV * D];
  static float out[B * SQ * HQ * D], lse[B * HQ * SQ];
  unsigned char mask[B * SK];
  int64_t qshape[4] = {B, SQ, HQ, D}, kshape[4] = {B, SK, HKV, D}, mshape[2] = {B, SK};
  int64_t lshape[3] = {B, HQ, SQ};
  llada_tensor tq, tk, tv, tm, to, tlse;
  const float scale = 1.0f / sqrtf((float)D);
  int b, s, h, t, d, i;

  for (i = 0; i < B * SQ * HQ * D; ++i) q[i] = (float)uniform(-1.0, 1.0);
  for (i = 0; i < B * SK * HKV * D; ++i) {
    k[i] = (float)uniform(-1.0, 1.0);
    v[i] = (float)uniform(-1.0, 1.0);
  }
  /* Batch 0 attends keys 0..4 only (right padding); batch 1 attends no key at all, which the
   * ABI defines as out = 0 and lse = -inf. */
  for (b = 0; b < B; ++b)
    for (t = 0; t < SK; ++t) mask[b * SK + t] = (unsigned char)(b == 0 && t < 5);
  tq = view(q, LLADA_FLOAT32, 4, qshape, 0);
  tk = view(k, LLADA_FLOAT32, 4, kshape, 0);
  tv = view(v, LLADA_FLOAT32, 4, kshape, 0);
  tm = view(mask, LLADA_BOOL, 2, mshape, 0);
  to = view(out, LLADA_FLOAT32, 4, qshape, 0);
  tlse = view(lse, LLADA_FLOAT32, 3, lshape, 0);
  if (!ok(llada_attention_fwd(&tq, &tk, &tv, &tm, scale, &to, &tlse, NULL), "llada_attention_fwd"))
    return;

  for (b = 0; b < B; ++b)
    for (h = 0; h < HQ; ++h) {
      const int hk = h / (HQ / HKV); /* GQA: query head h reads key/value head h / group */
      for (s = 0; s < SQ; ++s) {
        const float* qr = q + ((b * SQ + s) * HQ + h) * D;
        double score[SK], m = -INFINITY, z = 0.0, ref_lse, acc;
        for (t = 0; t < SK; ++t) {
          const float* kr = k + ((b * SK + t) * HKV + hk) * D;
          double dot = 0.0;
          for (d = 0; d < D; ++d) dot += (double)qr[d] * kr[d];
          score[t] = mask[b * SK + t] ? dot * scale : -INFINITY;
          if (score[t] > m) m = score[t];
        }
        for (t = 0; t < SK; ++t) z += mask[b * SK + t] ? exp(score[t] - m) : 0.0;
        ref_lse = z > 0.0 ? m + log(z) : -INFINITY;
        EXPECT(close_to(lse[(b * HQ + h) * SQ + s], ref_lse, 1e-5, 1e-5),
               "attention lse[%d,%d,%d] = %.7g, expected %.7g", b, h, s, lse[(b * HQ + h) * SQ + s],
               ref_lse);
        for (d = 0; d < D; ++d) {
          acc = 0.0;
          for (t = 0; t < SK; ++t)
            if (mask[b * SK + t])
              acc += exp(score[t] - m) / z * v[((b * SK + t) * HKV + hk) * D + d];
          EXPECT(close_to(out[((b * SQ + s) * HQ + h) * D + d], acc, 1e-5, 1e-4),
                 "attention out[%d,%d,%d,%d] = %.7g, expected %.7g", b, s, h, d,
                 out[((b * SQ + s) * HQ + h) * D + d], acc);
        }
      }
    }
  printf("attention forward: ok\n");
}

/* ---- remask ------------------------------------------------------------------------------- */
static void check_remask(void) {
  enum { B = 2, W = 6, V = 11, L = 9, OFFSET = 2, MASK = 10 };
  float logits[B * W * V], conf[B * W];
  int64_t x[B * L], x_out[B * L], x0[B * W], k_per_row[B] = {2, 1};
  int64_t lshape[3] = {B, W, V}, xshape[2] = {B, L}, wshape[2] = {B, W}, bshape[1] = {B};
  llada_tensor tl, tx, tk, txo, tx0, tc;
  llada_remask_params p;
  size_t ws = 1;
  int b, j, v, i;

  for (i = 0; i < B * W * V; ++i) logits[i] = (float)uniform(-3.0, 3.0);
  for (b = 0; b < B; ++b)
    for (j = 0; j < L; ++j)
      /* 4 masked positions in each row's window; every other token is an ordinary id. */
      x[b * L + j] = (j >= OFFSET && j < OFFSET + W && (j + b) % 3 != 0) ? MASK : (b * 3 + j) % 7;
  tl = view(logits, LLADA_FLOAT32, 3, lshape, 0);
  tx = view(x, LLADA_INT64, 2, xshape, 0);
  tk = view(k_per_row, LLADA_INT64, 1, bshape, 0);
  txo = view(x_out, LLADA_INT64, 2, xshape, 0);
  tx0 = view(x0, LLADA_INT64, 2, wshape, 0);
  tc = view(conf, LLADA_FLOAT32, 2, wshape, 0);
  memset(&p, 0, sizeof(p));
  p.mask_id = MASK;
  p.offset = OFFSET;
  p.strategy = LLADA_REMASK_LOW_CONFIDENCE;
  p.temperature = 0.0f; /* plain argmax: deterministic, no seed needed */
  if (!ok(llada_remask_workspace_size(&tl, &tx, &ws), "llada_remask_workspace_size")) return;
  EXPECT(ws == 0, "remask needs no workspace on the CPU, got %zu bytes", ws);
  if (!ok(llada_remask(&tl, NULL, &tx, &tk, &p, &txo, &tx0, &tc, NULL, 0, NULL), "llada_remask"))
    return;

  for (b = 0; b < B; ++b) {
    int64_t want_x[L], want_x0[W];
    double want_conf[W];
    int chosen[W], n_cand = 0, picked;
    for (j = 0; j < L; ++j) want_x[j] = x[b * L + j];
    for (j = 0; j < W; ++j) {
      const float* row = logits + (b * W + j) * V;
      chosen[j] = 0;
      want_x0[j] = x[b * L + OFFSET + j];
      want_conf[j] = -INFINITY;
      if (x[b * L + OFFSET + j] == MASK) {
        int best = 0; /* argmax, ties -> lowest id */
        double z = 0.0;
        for (v = 1; v < V; ++v)
          if (row[v] > row[best]) best = v;
        for (v = 0; v < V; ++v) z += exp((double)row[v] - row[best]);
        want_x0[j] = best;
        want_conf[j] = 1.0 / z; /* softmax probability of the argmax */
        ++n_cand;
      }
    }
    /* Keep the min(k, #candidates) most confident; ties -> lower position. */
    for (picked = 0; picked < k_per_row[b] && picked < n_cand; ++picked) {
      int arg = -1;
      for (j = 0; j < W; ++j)
        if (!chosen[j] && !isinf(want_conf[j]) && (arg < 0 || want_conf[j] > want_conf[arg]))
          arg = j;
      chosen[arg] = 1;
      want_x[OFFSET + arg] = want_x0[arg];
    }
    for (j = 0; j < L; ++j)
      EXPECT(x_out[b * L + j] == want_x[j], "remask x_out[%d,%d] = %lld, expected %lld", b, j,
             (long long)x_out[b * L + j], (long long)want_x[j]);
    for (j = 0; j < W; ++j) {
      EXPECT(x0[b * W + j] == want_x0[j], "remask x0[%d,%d] = %lld, expected %lld", b, j,
             (long long)x0[b * W + j], (long long)want_x0[j]);
      EXPECT(close_to(conf[b * W + j], want_conf[j], 1e-6, 1e-5),
             "remask confidence[%d,%d] = %.7g, expected %.7g", b, j, conf[b * W + j], want_conf[j]);
    }
  }
  printf("remask: ok\n");
}

/* ---- the error contract ------------------------------------------------------------------- */
static void check_errors(void) {
  float logits[6] = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f}, weights[2] = {1.0f, 1.0f}, loss[2];
  int32_t logits_i32[6] = {0, 1, 2, 3, 4, 5};
  int64_t targets[2] = {0, 2}, shape2[2] = {2, 3}, shape1[1] = {2};
  llada_tensor tl = view(logits, LLADA_FLOAT32, 2, shape2, 0);
  llada_tensor tt = view(targets, LLADA_INT64, 1, shape1, 0);
  llada_tensor tw = view(weights, LLADA_FLOAT32, 1, shape1, 0);
  llada_tensor tloss = view(loss, LLADA_FLOAT32, 1, shape1, 0);
  llada_tensor bad;
  llada_status s;

  s = llada_masked_ce_fwd(NULL, &tt, &tw, &tloss, NULL, NULL);
  EXPECT(s == LLADA_ERROR_INVALID_ARGUMENT, "null logits: got %s", llada_status_string(s));
  EXPECT(strlen(llada_last_error()) > 0, "null logits: empty error message");
  printf("null pointer -> %s: %s\n", llada_status_string(s), llada_last_error());

  bad = view(logits_i32, LLADA_INT32, 2, shape2, 0);
  s = llada_masked_ce_fwd(&bad, &tt, &tw, &tloss, NULL, NULL);
  EXPECT(s == LLADA_ERROR_UNSUPPORTED_DTYPE, "int32 logits: got %s", llada_status_string(s));
  EXPECT(strlen(llada_last_error()) > 0, "int32 logits: empty error message");
  printf("bad dtype    -> %s: %s\n", llada_status_string(s), llada_last_error());

  bad = tl;
  bad.dtype = 99; /* not an llada_dtype at all */
  s = llada_masked_ce_fwd(&bad, &tt, &tw, &tloss, NULL, NULL);
  EXPECT(s == LLADA_ERROR_UNSUPPORTED_DTYPE, "dtype 99: got %s", llada_status_string(s));

  bad = tt;
  bad.shape[0] = 3; /* one target more than logits rows */
  s = llada_masked_ce_fwd(&tl, &bad, &tw, &tloss, NULL, NULL);
  EXPECT(s == LLADA_ERROR_INVALID_ARGUMENT, "bad shape: got %s", llada_status_string(s));
  EXPECT(strlen(llada_last_error()) > 0, "bad shape: empty error message");

  /* The message stays until this thread's next call; a successful call clears it. */
  s = llada_masked_ce_fwd(&tl, &tt, &tw, &tloss, NULL, NULL);
  EXPECT(s == LLADA_OK, "valid call after errors: got %s", llada_status_string(s));
  EXPECT(strcmp(llada_last_error(), "") == 0, "a successful call leaves an empty error message");
  EXPECT(strcmp(llada_status_string(LLADA_ERROR_NOT_COMPILED), "LLADA_ERROR_NOT_COMPILED") == 0,
         "llada_status_string");
  printf("error contract: ok\n");
}

int main(void) {
  printf("llada kernels: runtime version %d, header version %d, CUDA kernels %s\n", llada_version(),
         LLADA_VERSION, llada_has_cuda() ? "yes" : "no");
  EXPECT(llada_version() == LLADA_VERSION, "runtime version %d != header version %d",
         llada_version(), LLADA_VERSION);
  check_masked_ce();
  check_attention();
  check_remask();
  check_errors();
  if (g_failures) {
    fprintf(stderr, "%d check(s) failed\n", g_failures);
    return 1;
  }
  printf("all checks passed\n");
  return 0;
}
