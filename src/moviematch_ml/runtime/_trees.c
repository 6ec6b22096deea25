/* The compiled twin of trees.TreeEnsemble's numpy evaluation: the same bit-vector tables, walked row by row in C.
 *
 * TreeEnsemble builds, per feature, the sorted split thresholds and the table of per-tree "false masks" for every
 * prefix of them (plus a NaN row). Evaluating one row is then: per feature, a binary search for the number of
 * thresholds below the value and an AND of that table row into the row's masks; per tree, the lowest set bit is
 * the exit leaf. numpy does this a feature at a time over a chunk of rows, with a Python call per step; here the
 * same steps run without those calls (a one-row prediction costs a small fraction of numpy's) and the
 * leaf values are added in tree order, as LightGBM adds them.
 *
 * The object keeps buffer views of TreeEnsemble's numpy arrays (no copy: the personalised model's tables are
 * megabytes) and releases the GIL while it evaluates a matrix.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* On x86-64 with glibc, eval_rows (with the row loops inlined into it) is compiled twice, for any x86-64 and for
 * AVX2 CPUs (x86-64-v3), and the loader picks the one the CPU runs: the AND passes then take 32 bytes at a time
 * (personalised batches 7% faster, six-feature ones 4%). A wheel or an image must run on any x86-64, so -march is
 * not an option; AVX-512 clones (x86-64-v4) were slower on the personalised model. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define EVAL_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef EVAL_CLONES
#define EVAL_CLONES
#endif

/* LightGBM reads |x| <= kZeroThreshold as exactly zero (model._ZERO_THRESHOLD); its constant is the float 1e-35f
 * widened to double (1.0000000180025095e-35), not the double 1e-35. */
#define ZERO_THRESHOLD ((double)1e-35f)

typedef struct {
    PyObject_HEAD
    Py_buffer thresholds;   /* float64: every feature's sorted thresholds, one after the other */
    Py_buffer thr_starts;   /* int64 (n_features + 1): feature j's thresholds are [thr_starts[j], thr_starts[j+1]) */
    Py_buffer tables;       /* uint32 or uint64 (rows, n_trees): every feature's table, one under the other */
    Py_buffer table_starts; /* int64 (n_features): the first row of feature j's table */
    Py_buffer leaf_values;  /* float64 (n_trees * width): tree t's leaves, left to right, at t * width */
    Py_ssize_t n_features, n_trees, width, n_rows;
    int word;  /* bytes per mask: 2 (trees of up to 16 leaves), 4 (32) or 8 (64), as TreeEnsemble stores them */
    int held;  /* the buffers are acquired (dealloc releases them) */
    int ready; /* the buffers passed every check: predictions may read them */
} Forest;

static Py_ssize_t lower_bound(const double *thr, Py_ssize_t n, double v) {
    /* How many thresholds are < v (numpy's searchsorted side="left", bisect_left). Branch-free halving: the
     * comparisons are unpredictable, and a conditional move costs less than a mispredicted jump. */
    if (n == 0) return 0;
    const double *base = thr;
    while (n > 1) {
        Py_ssize_t half = n / 2;
        base = base[half - 1] < v ? base + half : base;
        n -= half;
    }
    return (base - thr) + (base[0] < v);
}

static inline Py_ssize_t table_row(const Forest *f, Py_ssize_t j, double v) {
    const int64_t *starts = (const int64_t *)f->thr_starts.buf;
    Py_ssize_t k = (Py_ssize_t)(starts[j + 1] - starts[j]);
    Py_ssize_t r;
    if (v != v) {
        r = k + 1; /* the NaN row, after the K + 1 prefix rows */
    } else {
        if (fabs(v) <= ZERO_THRESHOLD) v = 0.0;
        r = lower_bound((const double *)f->thresholds.buf + starts[j], k, v);
    }
    return (Py_ssize_t)((const int64_t *)f->table_starts.buf)[j] + r;
}

static inline int same_value(double a, double b) {
    /* Equal values reach the same table row (0.0 and -0.0 too); NaN is its own row, whatever its bits. */
    return a == b || (a != a && b != b);
}

/* Rows of a batch. ``base`` holds the masks of the features every row shares (folded once, see eval_rows); the
 * ``n_vary`` others, in the order of ``vary`` (most repeated first), are ANDed in. The first ``n_memo`` of them
 * (those that often repeat from one row to the next: the movie features of a personalised batch, whose movies
 * the model mostly does not know, say) are ANDed one at a time and prefix[k] keeps the masks after the k-th: a
 * row that has the same values as the row before in its first k0 varying features starts from prefix[k0 - 1]
 * instead of from base. The others (the tail, which change on nearly every row) are ANDed together, up to four
 * table rows per pass over the masks, into the row's slot of ``fin``: one pass writes the masks once where a
 * pass per feature wrote and read them back each time. A row identical to the one before copies its answer.
 * The lowest set bit of each tree's mask is its exit leaf (a mask is never 0: every table row keeps the
 * rightmost leaf of each tree), and each row's leaf values are added in tree order, as LightGBM adds them. */
#define PENDING 4
#define DEFINE_ROWS(NAME, WORD, CTZ)                                                                        \
    static inline double NAME##_sum(const WORD *m, const double *leaves, Py_ssize_t nt, Py_ssize_t width) {  \
        const WORD stop = (WORD)((WORD)1 << (width - 1));                                                   \
        double sum = 0.0;                                                                                   \
        for (Py_ssize_t t = 0; t < nt; t++) sum += leaves[t * width + CTZ(m[t] | stop)];                    \
        return sum;                                                                                         \
    }                                                                                                       \
    /* The sums of PENDING rows' masks (fin, one after the other), side by side: four independent chains of  \
     * additions in flight instead of one, each still in tree order. */                                      \
    static inline void NAME##_sum4(const WORD *fin, const double *leaves, Py_ssize_t nt, Py_ssize_t width,   \
                                   double *out0, double *out1, double *out2, double *out3) {                 \
        const WORD *m0 = fin, *m1 = fin + nt, *m2 = fin + 2 * nt, *m3 = fin + 3 * nt;                       \
        const WORD stop = (WORD)((WORD)1 << (width - 1));                                                   \
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                                      \
        for (Py_ssize_t t = 0; t < nt; t++) {                                                               \
            const double *lv = leaves + t * width;                                                          \
            s0 += lv[CTZ(m0[t] | stop)];                                                                    \
            s1 += lv[CTZ(m1[t] | stop)];                                                                    \
            s2 += lv[CTZ(m2[t] | stop)];                                                                    \
            s3 += lv[CTZ(m3[t] | stop)];                                                                    \
        }                                                                                                   \
        *out0 = s0;                                                                                         \
        *out1 = s1;                                                                                         \
        *out2 = s2;                                                                                         \
        *out3 = s3;                                                                                         \
    }                                                                                                       \
    /* dst = src & the q (1 to 4) table rows r. */                                                          \
    static inline void NAME##_and(WORD *restrict dst, const WORD *src, const WORD *const *r, Py_ssize_t q,   \
                                  Py_ssize_t nt) {                                                          \
        const WORD *r0 = r[0], *r1 = r[q > 1], *r2 = r[q > 2 ? 2 : 0], *r3 = r[q > 3 ? 3 : 0];               \
        switch (q) {                                                                                        \
        case 1:                                                                                             \
            for (Py_ssize_t t = 0; t < nt; t++) dst[t] = src[t] & r0[t];                                    \
            break;                                                                                          \
        case 2:                                                                                             \
            for (Py_ssize_t t = 0; t < nt; t++) dst[t] = src[t] & r0[t] & r1[t];                            \
            break;                                                                                          \
        case 3:                                                                                             \
            for (Py_ssize_t t = 0; t < nt; t++) dst[t] = src[t] & r0[t] & r1[t] & r2[t];                    \
            break;                                                                                          \
        default:                                                                                            \
            for (Py_ssize_t t = 0; t < nt; t++) dst[t] = src[t] & r0[t] & r1[t] & r2[t] & r3[t];            \
        }                                                                                                   \
    }                                                                                                       \
    /* Inlined into eval_rows, so that its AVX2 clone (EVAL_CLONES) covers these loops too. */               \
    static inline __attribute__((always_inline)) void NAME(const Forest *f, const double *x, Py_ssize_t n,     \
                                                           Py_ssize_t stride, const Py_ssize_t *feat,       \
                                                           double *out, const Py_ssize_t *vary,             \
                                                           Py_ssize_t n_vary, Py_ssize_t n_memo,            \
                                                           const WORD *base, WORD *prefix, WORD *fin) {     \
        const Py_ssize_t nt = f->n_trees, width = f->width;                                                 \
        const WORD *tables = (const WORD *)f->tables.buf;                                                   \
        const double *leaves = (const double *)f->leaf_values.buf;                                          \
        Py_ssize_t pending[PENDING], np_ = 0; /* rows whose masks wait in fin for their sums */            \
        for (Py_ssize_t i = 0; i < n; i++) {                                                                \
            const double *xi = x + i * stride;                                                              \
            Py_ssize_t k0 = 0;                                                                              \
            if (i > 0) {                                                                                    \
                while (k0 < n_vary && same_value(xi[vary[k0]], xi[vary[k0] - stride])) k0++;                \
                if (k0 == n_vary) {                                                                         \
                    for (Py_ssize_t p = 0; p < np_; p++)                                                    \
                        out[pending[p]] = NAME##_sum(fin + p * nt, leaves, nt, width);                      \
                    np_ = 0;                                                                                \
                    out[i] = out[i - 1];                                                                    \
                    continue;                                                                               \
                }                                                                                           \
            }                                                                                               \
            if (n_vary == 0) {                                                                              \
                out[i] = NAME##_sum(base, leaves, nt, width);                                               \
                continue;                                                                                   \
            }                                                                                               \
            for (Py_ssize_t k = k0; k < n_memo; k++) {                                                      \
                const WORD *row = tables + table_row(f, feat[vary[k]], xi[vary[k]]) * nt;                   \
                NAME##_and(prefix + k * nt, k == 0 ? base : prefix + (k - 1) * nt, &row, 1, nt);            \
            }                                                                                               \
            /* The tail, from the memo's last level, four table rows a pass; the last pass writes to fin. */ \
            const WORD *src = n_memo == 0 ? base : prefix + (n_memo - 1) * nt;                              \
            for (Py_ssize_t k = n_memo; k < n_vary; k += 4) {                                               \
                const Py_ssize_t q = n_vary - k < 4 ? n_vary - k : 4;                                       \
                const WORD *rows[4] = {NULL, NULL, NULL, NULL};                                             \
                for (Py_ssize_t c = 0; c < q; c++)                                                          \
                    rows[c] = tables + table_row(f, feat[vary[k + c]], xi[vary[k + c]]) * nt;               \
                WORD *dst = k + q == n_vary ? fin + np_ * nt : prefix + (k + q - 1) * nt;                   \
                NAME##_and(dst, src, rows, q, nt);                                                          \
                src = dst;                                                                                  \
            }                                                                                               \
            pending[np_++] = i;                                                                             \
            if (np_ == PENDING) {                                                                           \
                NAME##_sum4(fin, leaves, nt, width, out + pending[0], out + pending[1], out + pending[2],    \
                            out + pending[3]);                                                              \
                np_ = 0;                                                                                    \
            }                                                                                               \
        }                                                                                                   \
        for (Py_ssize_t p = 0; p < np_; p++) out[pending[p]] = NAME##_sum(fin + p * nt, leaves, nt, width); \
    }                                                                                                       \
    static void NAME##_fold(const Forest *f, Py_ssize_t j, double value, WORD *base) {                      \
        const WORD *row = (const WORD *)f->tables.buf + table_row(f, j, value) * f->n_trees;                \
        for (Py_ssize_t t = 0; t < f->n_trees; t++) base[t] &= row[t];                                      \
    }

DEFINE_ROWS(rows16, uint16_t, __builtin_ctz)
DEFINE_ROWS(rows32, uint32_t, __builtin_ctz)
DEFINE_ROWS(rows64, uint64_t, __builtin_ctzll)

/* AND feature j's table row for ``value`` into the starting masks ``base``, in the forest's word size. */
static inline void fold(const Forest *f, Py_ssize_t j, double value, void *base) {
    if (f->word == 8) rows64_fold(f, j, value, (uint64_t *)base);
    else if (f->word == 4) rows32_fold(f, j, value, (uint32_t *)base);
    else rows16_fold(f, j, value, (uint16_t *)base);
}

/* Evaluate n rows of x into out. x is row-major with ``stride`` columns, column c holding feature feat[c] (every
 * feature, in order, for a plain matrix); the features that are not columns (``values`` non-NULL) take the value
 * values[j] in every row. A feature with the same value in every row (a batch for one user: the user's count,
 * mean, recent ratings...) is looked up once and folded into the starting masks, so the per-row work is only
 * that of the columns that vary; these are taken in order of how often a row repeats the value of the row
 * before, so that repeated leading values are looked up once too (see DEFINE_ROWS). scratch: SCRATCH_WORDS 8-byte
 * words; vary and repeats: n_features entries; stride <= n_features, feat without repeats. */
/* Words of scratch eval_rows needs: base, a prefix per feature, PENDING rows' final masks. */
#define SCRATCH_WORDS(nf, nt) (((size_t)(nf) + 1 + PENDING) * (size_t)(nt))

EVAL_CLONES static void eval_rows(const Forest *f, const double *x, Py_ssize_t n, Py_ssize_t stride,
                                  const Py_ssize_t *feat, const double *values, double *out, void *scratch,
                                  Py_ssize_t *vary, Py_ssize_t *repeats) {
    const Py_ssize_t nf = f->n_features, nt = f->n_trees;
    const size_t word = (size_t)f->word;
    Py_ssize_t n_vary = 0;
    if (n == 0) return;
    memset(scratch, 0xff, (size_t)nt * word);
    /* The features that are not columns of x take their one value from ``values``: folded once. */
    if (values != NULL) {
        for (Py_ssize_t j = 0; j < nf; j++) {
            Py_ssize_t c = 0;
            while (c < stride && feat[c] != j) c++;
            if (c < stride) continue; /* a column of x */
            fold(f, j, values[j], scratch);
        }
    }
    /* How often each column repeats the row before, counted row by row: one sequential pass over x (a pass per
     * column read it with a stride of a whole row, 20 times over for the personalised model: a tenth of its
     * evaluation of a 1,000-movie batch).
     * The counts wait in vary: the insertion below writes vary[k] only for k <= c, after reading vary[c]. */
    for (Py_ssize_t c = 0; c < stride; c++) vary[c] = 0;
    Py_ssize_t c0 = 0;
#if defined(__SSE2__)
    /* Two columns at a time: equal, or both NaN (same_value), as an all-ones lane subtracted from its count. */
    __m128i counts[32];
    const Py_ssize_t paired = stride <= 64 ? stride & ~(Py_ssize_t)1 : 0;
    for (Py_ssize_t p = 0; p < paired / 2; p++) counts[p] = _mm_setzero_si128();
    for (Py_ssize_t i = 1; i < n && paired; i++) {
        const double *a = x + i * stride, *b = a - stride;
        for (Py_ssize_t p = 0; p < paired / 2; p++) {
            const __m128d va = _mm_loadu_pd(a + 2 * p), vb = _mm_loadu_pd(b + 2 * p);
            const __m128d nans = _mm_and_pd(_mm_cmpunord_pd(va, va), _mm_cmpunord_pd(vb, vb));
            const __m128d same = _mm_or_pd(_mm_cmpeq_pd(va, vb), nans);
            counts[p] = _mm_sub_epi64(counts[p], _mm_castpd_si128(same));
        }
    }
    for (Py_ssize_t p = 0; p < paired / 2; p++) {
        int64_t cnt[2];
        _mm_storeu_si128((__m128i *)cnt, counts[p]);
        vary[2 * p] = (Py_ssize_t)cnt[0];
        vary[2 * p + 1] = (Py_ssize_t)cnt[1];
    }
    c0 = paired;
#endif
    for (Py_ssize_t i = 1; i < n && c0 < stride; i++) {
        const double *a = x + i * stride, *b = a - stride;
        for (Py_ssize_t c = c0; c < stride; c++) vary[c] += same_value(a[c], b[c]);
    }
    for (Py_ssize_t c = 0; c < stride; c++) {
        const Py_ssize_t same = vary[c];
        if (n > 1 && same == n - 1) {
            fold(f, feat[c], x[c], scratch);
        } else {
            /* Insertion by decreasing repeats (stable: equal counts keep the columns' order). */
            Py_ssize_t k = n_vary++;
            while (k > 0 && repeats[k - 1] < same) {
                vary[k] = vary[k - 1];
                repeats[k] = repeats[k - 1];
                k--;
            }
            vary[k] = c;
            repeats[k] = same;
        }
    }
    /* The memo: the leading varying columns that repeat on at least a quarter of the rows; always one fewer than
     * all of them, so that the tail (which ends in fin) is never empty. */
    Py_ssize_t n_memo = 0;
    while (n_memo + 1 < n_vary && 4 * repeats[n_memo] >= n - 1) n_memo++;
    char *prefix = (char *)scratch + (size_t)nt * word;
    char *fin = prefix + (size_t)nf * (size_t)nt * word;
    if (f->word == 8)
        rows64(f, x, n, stride, feat, out, vary, n_vary, n_memo, (const uint64_t *)scratch, (uint64_t *)prefix,
               (uint64_t *)fin);
    else if (f->word == 4)
        rows32(f, x, n, stride, feat, out, vary, n_vary, n_memo, (const uint32_t *)scratch, (uint32_t *)prefix,
               (uint32_t *)fin);
    else
        rows16(f, x, n, stride, feat, out, vary, n_vary, n_memo, (const uint16_t *)scratch, (uint16_t *)prefix,
               (uint16_t *)fin);
}

static int check(int ok, const char *what) {
    if (!ok) PyErr_Format(PyExc_ValueError, "Forest: %s", what);
    return ok;
}

static int Forest_init(Forest *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"thresholds", "thr_starts", "tables", "table_starts", "leaf_values", "n_trees", NULL};
    if (self->held) {
        PyErr_SetString(PyExc_RuntimeError, "Forest: already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*y*y*y*n", kwlist, &self->thresholds, &self->thr_starts,
                                     &self->tables, &self->table_starts, &self->leaf_values, &self->n_trees)) {
        return -1;
    }
    self->held = 1; /* from here on dealloc releases the buffers; ready is set only once they are checked */
    Py_ssize_t n_features = self->table_starts.len / 8;
    self->n_features = n_features;
    if (!check(self->n_trees > 0 && n_features > 0, "no trees or no features") ||
        !check(self->thr_starts.len == (n_features + 1) * 8, "thr_starts must hold n_features + 1 int64") ||
        !check(self->leaf_values.len % (8 * self->n_trees) == 0, "leaf_values must hold n_trees * width float64")) {
        return -1;
    }
    self->width = self->leaf_values.len / (8 * self->n_trees);
    Py_ssize_t rows_bytes = self->tables.len;
    self->n_rows = 0;
    if (!check(self->width >= 1 && self->width <= 64, "a tree has 1 to 64 leaves")) return -1;
    /* The masks' word size follows from the width, as TreeEnsemble chooses it for this evaluator. */
    Py_ssize_t wsize = self->width <= 16 ? 2 : self->width <= 32 ? 4 : 8;
    self->word = (int)wsize;
    if (!check(rows_bytes % (wsize * self->n_trees) == 0, "tables must be (rows, n_trees) masks")) return -1;
    self->n_rows = rows_bytes / (wsize * self->n_trees);
    /* Every row a lookup can reach must lie inside the tables: thresholds in order, K + 2 rows per feature. */
    const int64_t *ts = (const int64_t *)self->thr_starts.buf;
    const int64_t *tb = (const int64_t *)self->table_starts.buf;
    if (!check(ts[0] == 0 && ts[n_features] * 8 == self->thresholds.len, "thr_starts must cover the thresholds"))
        return -1;
    for (Py_ssize_t j = 0; j < n_features; j++) {
        /* Written so that nothing overflows: k + 2 <= n_rows first, then the start against what is left. */
        if (!check(ts[j] <= ts[j + 1], "thr_starts must not decrease") ||
            !check(ts[j + 1] - ts[j] <= self->n_rows - 2, "a table lies outside tables") ||
            !check(tb[j] >= 0 && tb[j] <= self->n_rows - 2 - (ts[j + 1] - ts[j]), "a table lies outside tables"))
            return -1;
    }
    self->ready = 1;
    return 0;
}

static void Forest_dealloc(Forest *self) {
    if (self->held) {
        PyBuffer_Release(&self->thresholds);
        PyBuffer_Release(&self->thr_starts);
        PyBuffer_Release(&self->tables);
        PyBuffer_Release(&self->table_starts);
        PyBuffer_Release(&self->leaf_values);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int require_ready(Forest *self) {
    if (!self->ready) PyErr_SetString(PyExc_RuntimeError, "Forest: not initialised");
    return self->ready;
}

/* predict(x, out, columns=None, values=None): x a C-contiguous float64 (n, n_features) buffer, out a writable
 * float64 (n,) buffer. With ``columns`` (int64, k distinct features) and ``values`` (float64, n_features), x is
 * (n, k), its column c holding feature columns[c], and every other feature j takes values[j] in every row: a
 * caller whose rows share most of their inputs (one user's batch) writes and passes only the ones that differ. */
static PyObject *Forest_predict(Forest *self, PyObject *args) {
    Py_buffer x, out, cols = {0}, vals = {0};
    PyObject *cols_obj = Py_None, *vals_obj = Py_None;
    if (!require_ready(self) || !PyArg_ParseTuple(args, "y*w*|OO", &x, &out, &cols_obj, &vals_obj)) return NULL;
    PyObject *result = NULL;
    void *scratch = NULL;
    const Py_ssize_t nf = self->n_features;
    Py_ssize_t stride = nf;
    if ((cols_obj == Py_None) != (vals_obj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "Forest.predict: columns and values go together");
        goto done;
    }
    if (cols_obj != Py_None) {
        if (PyObject_GetBuffer(cols_obj, &cols, PyBUF_SIMPLE) < 0 ||
            PyObject_GetBuffer(vals_obj, &vals, PyBUF_SIMPLE) < 0)
            goto done;
        stride = cols.len / 8;
        if (cols.len % 8 != 0 || stride < 1 || stride > nf || vals.len != nf * 8) {
            PyErr_SetString(PyExc_ValueError,
                            "Forest.predict: columns must be 1 to n_features int64 and values n_features float64");
            goto done;
        }
    }
    Py_ssize_t n = out.len / 8;
    if (out.len % 8 != 0 || x.len != n * 8 * stride) {
        PyErr_SetString(PyExc_ValueError, "Forest.predict: x must be (n, n_features) float64 and out (n,) float64");
        goto done;
    }
    size_t masks = SCRATCH_WORDS(nf, self->n_trees) * 8;
    scratch = PyMem_RawMalloc(masks + 3 * (size_t)nf * sizeof(Py_ssize_t));
    if (scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t *vary = (Py_ssize_t *)((char *)scratch + masks), *feat = vary + 2 * nf;
    if (cols.buf != NULL) {
        const int64_t *c = (const int64_t *)cols.buf;
        for (Py_ssize_t k = 0; k < stride; k++) {
            int seen = 0;
            for (Py_ssize_t q = 0; q < k; q++) seen |= c[q] == c[k];
            if (c[k] < 0 || c[k] >= nf || seen) {
                PyErr_SetString(PyExc_ValueError, "Forest.predict: columns must be distinct features");
                goto done;
            }
            feat[k] = (Py_ssize_t)c[k];
        }
    } else {
        for (Py_ssize_t j = 0; j < nf; j++) feat[j] = j;
    }
    const double *xs = (const double *)x.buf, *vs = (const double *)vals.buf;
    double *ys = (double *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    eval_rows(self, xs, n, stride, feat, vs, ys, scratch, vary, vary + nf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(scratch);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    if (cols.obj != NULL) PyBuffer_Release(&cols);
    if (vals.obj != NULL) PyBuffer_Release(&vals);
    return result;
}

/* predict_row(values): one row given as a list or tuple of floats; returns the sum as a float. */
static PyObject *Forest_predict_row(Forest *self, PyObject *values) {
    if (!require_ready(self)) return NULL;
    PyObject *seq = PySequence_Fast(values, "Forest.predict_row: expected a list or tuple of floats");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != self->n_features) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "Forest.predict_row: %zd values for %zd features", n,
                            self->n_features);
    }
    /* One row: no batch to share work with, and the masks (n_features + 1 rows of n_trees words) are small. */
    double stack_x[64];
    Py_ssize_t stack_idx[192];
    uint64_t stack_m[4096];
    size_t masks = SCRATCH_WORDS(n, self->n_trees);
    double *xv = n <= 64 ? stack_x : PyMem_Malloc((size_t)n * sizeof(double));
    Py_ssize_t *vary = n <= 64 ? stack_idx : PyMem_Malloc(3 * (size_t)n * sizeof(Py_ssize_t));
    void *m = masks <= 4096 ? (void *)stack_m : PyMem_Malloc(masks * 8);
    PyObject *result = NULL;
    if (xv == NULL || m == NULL || vary == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t j = 0; j < n; j++) {
        double v = PyFloat_AsDouble(items[j]);
        if (v == -1.0 && PyErr_Occurred()) goto done;
        xv[j] = v;
    }
    double y;
    Py_ssize_t *feat = vary + 2 * n;
    for (Py_ssize_t j = 0; j < n; j++) feat[j] = j;
    eval_rows(self, xv, 1, n, feat, NULL, &y, m, vary, vary + n);
    result = PyFloat_FromDouble(y);
done:
    if (xv != stack_x) PyMem_Free(xv);
    if (vary != stack_idx) PyMem_Free(vary);
    if (m != (void *)stack_m) PyMem_Free(m);
    Py_DECREF(seq);
    return result;
}

static PyMethodDef Forest_methods[] = {
    {"predict", (PyCFunction)Forest_predict, METH_VARARGS,
     "predict(x, out, columns=None, values=None): the sum of leaf values of each row of x (C-contiguous float64, "
     "(n, n_features), or (n, len(columns)) with the other features at values) into out."},
    {"predict_row", (PyCFunction)Forest_predict_row, METH_O,
     "predict_row(values): the sum of leaf values of one row given as a list or tuple of floats."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForestType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "moviematch_ml.runtime._trees.Forest",
    .tp_doc = PyDoc_STR("Bit-vector tree evaluation over trees.TreeEnsemble's tables (see runtime/trees.py)."),
    .tp_basicsize = sizeof(Forest),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Forest_init,
    .tp_dealloc = (destructor)Forest_dealloc,
    .tp_methods = Forest_methods,
};

static struct PyModuleDef trees_module = {
    PyModuleDef_HEAD_INIT, .m_name = "moviematch_ml.runtime._trees",
    .m_doc = "Compiled evaluation of trees.TreeEnsemble's tables.", .m_size = -1,
};

PyMODINIT_FUNC PyInit__trees(void) {
    if (PyType_Ready(&ForestType) < 0) return NULL;
    PyObject *m = PyModule_Create(&trees_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Forest", (PyObject *)&ForestType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
