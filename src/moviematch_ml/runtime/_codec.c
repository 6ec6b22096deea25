/* The per-movie loops of /predict-batch and the personalised model, in C: the feature matrix from the decoded
 * movies, the JSON of the answer's rows, the movies' positions in a model's id index, one user's input rows and
 * a user's view (the fold-in). In Python each loop builds a tuple or a dict per row. runtime/native.py is the only
 * importer: it keeps each kernel's Python twin and uses it whenever a kernel declines (returns None or False).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    char *b = PyMem_Realloc(o->buf, (size_t)cap);
    if (b == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->buf = b;
    o->cap = cap;
    return 0;
}

static int out_put(Out *o, const char *s, Py_ssize_t n) {
    if (out_reserve(o, n) < 0) return -1;
    memcpy(o->buf + o->len, s, (size_t)n);
    o->len += n;
    return 0;
}

#define PUT_LIT(o, lit) out_put((o), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* Decimal digits of v (>= 0) into the end of buf; returns the start. */
static char *digits(unsigned long long v, char *end) {
    do {
        *--end = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

/* A rating as orjson writes it: the shortest text that reads back as the same double (what repr gives), "null"
 * for NaN or infinity. The ratings are rounded to 3 decimals, so the fast case is a double that is exactly the
 * nearest one to k / 1000 for an integer k (IEEE division is correctly rounded, so (double)k / 1000 == v says
 * so): its shortest text is k / 1000 with the trailing zeros of the fraction dropped, as repr writes it. Any
 * other double goes through Python's own repr, as long as repr writes it without an exponent (0, or
 * 1e-4 <= |v| < 1e16); the rest is declined, since repr and orjson write exponents differently. Returns 1 if
 * written, 0 if declined, -1 on error. */
static int put_rating(Out *o, double v) {
    if (!isfinite(v)) return PUT_LIT(o, "null") < 0 ? -1 : 1;
    double a = fabs(v);
    if (a < 1e12) {
        long long k = llround(a * 1000.0);
        if ((double)k / 1000.0 == a) {
            char buf[48];
            char *end = buf + sizeof buf;
            unsigned long long frac = (unsigned long long)(k % 1000);
            int places = 3;
            while (places > 1 && frac % 10 == 0) {
                frac /= 10;
                places--;
            }
            char *p = end;
            for (int d = 0; d < places; d++) {
                *--p = (char)('0' + frac % 10);
                frac /= 10;
            }
            *--p = '.';
            p = digits((unsigned long long)(k / 1000), p);
            if (signbit(v)) *--p = '-';
            return out_put(o, p, end - p) < 0 ? -1 : 1;
        }
    }
    if (a != 0.0 && (a < 1e-4 || a >= 1e16)) return 0;
    char *s = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL) return -1;
    int rc = out_put(o, s, (Py_ssize_t)strlen(s));
    PyMem_Free(s);
    return rc < 0 ? -1 : 1;
}

/* rows(ids, ratings, order, source, sources, prefix) -> bytes | None
 *
 * The rows of a batch answer, comma-separated, in ``order`` (a list of indices; None: 0..n-1):
 *   {"movie_id":ID,"predicted_rating":R,"source":S,"prediction_id":"PREFIX-I"}
 * ids: list of int (0..2**63-1); ratings: list of float; source: the JSON of every row's source (e.g. b'"model"'),
 * or sources: a list of such JSON fragments, one per row (then source is ignored); prefix: the batch id (hex
 * digits, written as given). None (declined) when an id is not an int or a rating would need an exponent. */
static PyObject *rows(PyObject *self, PyObject *args) {
    PyObject *ids, *ratings, *order, *source, *sources, *prefix;
    if (!PyArg_ParseTuple(args, "O!O!OSOS", &PyList_Type, &ids, &PyList_Type, &ratings, &order, &source, &sources,
                          &prefix))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(ids);
    if (PyList_GET_SIZE(ratings) != n) {
        PyErr_SetString(PyExc_ValueError, "rows: ids and ratings differ in length");
        return NULL;
    }
    if (order != Py_None && !PyList_Check(order)) {
        PyErr_SetString(PyExc_TypeError, "rows: order must be a list or None");
        return NULL;
    }
    if (sources != Py_None && (!PyList_Check(sources) || PyList_GET_SIZE(sources) != n)) {
        PyErr_SetString(PyExc_TypeError, "rows: sources must be None or a list of one bytes per row");
        return NULL;
    }
    Py_ssize_t count = order == Py_None ? n : PyList_GET_SIZE(order);
    Out o = {NULL, 0, 0};
    PyObject *result = NULL;
    char num[32];
    const char *pre = PyBytes_AS_STRING(prefix);
    Py_ssize_t pre_len = PyBytes_GET_SIZE(prefix);
    if (out_reserve(&o, count * (96 + pre_len)) < 0) goto done;
    for (Py_ssize_t k = 0; k < count; k++) {
        Py_ssize_t i = k;
        if (order != Py_None) {
            i = PyLong_AsSsize_t(PyList_GET_ITEM(order, k));
            if (i == -1 && PyErr_Occurred()) goto done;
            if (i < 0 || i >= n) {
                PyErr_SetString(PyExc_IndexError, "rows: order holds an index out of range");
                goto done;
            }
        }
        PyObject *id = PyList_GET_ITEM(ids, i);
        if (!PyLong_CheckExact(id)) goto declined;
        int overflow = 0;
        long long idv = PyLong_AsLongLongAndOverflow(id, &overflow);
        if (overflow || idv < 0) goto declined;
        PyObject *r = PyList_GET_ITEM(ratings, i);
        if (!PyFloat_CheckExact(r)) goto declined;
        PyObject *src = sources == Py_None ? source : PyList_GET_ITEM(sources, i);
        if (!PyBytes_Check(src)) {
            PyErr_SetString(PyExc_TypeError, "rows: a source must be bytes");
            goto done;
        }
        if (k > 0 && PUT_LIT(&o, ",") < 0) goto done;
        char *id_text = digits((unsigned long long)idv, num + sizeof num);
        if (PUT_LIT(&o, "{\"movie_id\":") < 0 || out_put(&o, id_text, num + sizeof num - id_text) < 0 ||
            PUT_LIT(&o, ",\"predicted_rating\":") < 0)
            goto done;
        int written = put_rating(&o, PyFloat_AS_DOUBLE(r));
        if (written < 0) goto done;
        if (written == 0) goto declined;
        char *index_text = digits((unsigned long long)i, num + sizeof num);
        if (PUT_LIT(&o, ",\"source\":") < 0 || out_put(&o, PyBytes_AS_STRING(src), PyBytes_GET_SIZE(src)) < 0 ||
            PUT_LIT(&o, ",\"prediction_id\":\"") < 0 || out_put(&o, pre, pre_len) < 0 || PUT_LIT(&o, "-") < 0 ||
            out_put(&o, index_text, num + sizeof num - index_text) < 0 || PUT_LIT(&o, "\"}") < 0)
            goto done;
    }
    result = PyBytes_FromStringAndSize(o.buf ? o.buf : "", o.len);
    goto done;
declined:
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(o.buf);
    return result;
}

/* matrix(movies, names, out) -> bool
 *
 * Writes getattr(movie, name) as a double for every movie and name, row after row, into ``out`` (a writable
 * float64 buffer of len(movies) * len(names)). The values are ints, bools or floats already validated by the
 * decoder; False (declined) if one is anything else. */
static PyObject *matrix(PyObject *self, PyObject *args) {
    PyObject *movies, *names;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "O!O!w*", &PyList_Type, &movies, &PyTuple_Type, &names, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(movies), f = PyTuple_GET_SIZE(names);
    if (out.len != n * f * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "matrix: out must hold len(movies) * len(names) float64");
        goto done;
    }
    double *x = (double *)out.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        /* getattr may run Python code (a property) that changes the list: hold the movie, re-check the size. */
        if (PyList_GET_SIZE(movies) != n) {
            PyErr_SetString(PyExc_RuntimeError, "matrix: the list of movies changed size");
            goto done;
        }
        PyObject *movie = Py_NewRef(PyList_GET_ITEM(movies, i));
        for (Py_ssize_t j = 0; j < f; j++) {
            PyObject *v = PyObject_GetAttr(movie, PyTuple_GET_ITEM(names, j));
            if (v == NULL) {
                Py_DECREF(movie);
                goto done;
            }
            double d;
            if (PyFloat_CheckExact(v)) {
                d = PyFloat_AS_DOUBLE(v);
            } else if (PyLong_Check(v)) { /* int, and bool (True is 1.0) */
                d = PyLong_AsDouble(v);
                if (d == -1.0 && PyErr_Occurred()) {
                    Py_DECREF(v);
                    Py_DECREF(movie);
                    goto done;
                }
            } else {
                Py_DECREF(v);
                Py_DECREF(movie);
                result = Py_NewRef(Py_False);
                goto done;
            }
            Py_DECREF(v);
            x[i * f + j] = d;
        }
        Py_DECREF(movie);
    }
    result = Py_NewRef(Py_True);
done:
    PyBuffer_Release(&out);
    return result;
}

/* positions(keys, index, default, out, dense=None) -> int
 *
 * out[k] = index.get(keys[k], default) for every key, into ``out`` (a writable int64 buffer of len(keys)): the
 * lookup of a batch's movie ids in a model's id -> position dict. ``map(index.get, ...)`` into numpy costs about
 * 35 ns a key in calls and boxing; this is the hash probe alone. ``dense``, optional, is an int32 buffer holding
 * index[k] at position k for every int key k of ``index`` (-1 where ``index`` has no such key): an int key
 * inside it is read from there instead of probing the dict (the dict's entries are spread over a megabyte; the
 * array is one read). With ``complete`` true, ``dense`` holds every non-negative int key of ``index`` and no other
 * key of ``index`` equals an int (a float or a bool, say): a non-negative int past its end then takes the default
 * without a probe (ids above the catalogue's highest are common in a batch, and each probe of the large dict is a
 * cache miss). The values must be ints (TypeError otherwise). Returns how many keys were not ints (so a caller
 * whose index has int keys knows that no key needed another spelling). */
static PyObject *positions(PyObject *self, PyObject *args) {
    PyObject *keys, *index, *dense_obj = Py_None;
    long long dflt;
    int complete = 0;
    Py_buffer out, dense = {0};
    if (!PyArg_ParseTuple(args, "O!O!Lw*|Op", &PyList_Type, &keys, &PyDict_Type, &index, &dflt, &out, &dense_obj,
                          &complete))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys), n_dense = 0, not_int = 0;
    if (dense_obj != Py_None) {
        if (PyObject_GetBuffer(dense_obj, &dense, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&out);
            return NULL;
        }
        if (dense.len % (Py_ssize_t)sizeof(int32_t) != 0) {
            PyErr_SetString(PyExc_ValueError, "positions: dense must be an int32 buffer");
            goto done;
        }
        n_dense = dense.len / (Py_ssize_t)sizeof(int32_t);
    }
    if (out.len != n * (Py_ssize_t)sizeof(long long)) {
        PyErr_SetString(PyExc_ValueError, "positions: out must hold len(keys) int64");
        goto done;
    }
    long long *pos = (long long *)out.buf;
    const int32_t *dn = (const int32_t *)dense.buf;
    /* Two passes when there is a dense array: the first reads the keys and asks for their entries of it (a batch's
     * ids land all over an array that the trees have pushed out of the cache since the last request: one miss
     * each), the second reads those entries, by then on their way; in one pass each miss is waited for in
     * turn. */
    unsigned char *from_dense = n_dense ? PyMem_Malloc((size_t)n + 1) : NULL;
    if (n_dense && from_dense == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        /* A key's __hash__ or __eq__ may run Python code that changes the list: re-check its size. */
        if (PyList_GET_SIZE(keys) != n) {
            PyErr_SetString(PyExc_RuntimeError, "positions: the list of keys changed size");
            goto fail;
        }
        PyObject *key = PyList_GET_ITEM(keys, k);
        if (from_dense) from_dense[k] = 0;
        if (PyLong_CheckExact(key)) {
            if (n_dense) {
                int overflow = 0;
                long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
                if (!overflow && v >= 0 && v < n_dense) {
                    __builtin_prefetch(dn + v);
                    pos[k] = v;
                    from_dense[k] = 1;
                    continue;
                }
                if (complete && (overflow > 0 || (!overflow && v >= 0))) {
                    pos[k] = dflt; /* past the end of a complete array: not a key of index */
                    continue;
                }
            }
        } else {
            not_int++;
        }
        Py_INCREF(key);
        PyObject *v = PyDict_GetItemWithError(index, key); /* borrowed */
        Py_DECREF(key);
        if (v == NULL) {
            if (PyErr_Occurred()) goto fail; /* an unhashable key */
            pos[k] = dflt;
            continue;
        }
        if (!PyLong_Check(v)) {
            PyErr_SetString(PyExc_TypeError, "positions: the index's values must be ints");
            goto fail;
        }
        long long p = PyLong_AsLongLong(v);
        if (p == -1 && PyErr_Occurred()) goto fail;
        pos[k] = p;
    }
    if (n_dense) {
        for (Py_ssize_t k = 0; k < n; k++) {
            if (from_dense[k]) pos[k] = dn[pos[k]] >= 0 ? dn[pos[k]] : dflt;
        }
        PyMem_Free(from_dense);
    }
    result = PyLong_FromSsize_t(not_int);
    goto done;
fail:
    PyMem_Free(from_dense);
done:
    PyBuffer_Release(&out);
    if (dense.obj != NULL) PyBuffer_Release(&dense);
    return result;
}

/* user_rows(rows, x6, table, factors, user_factors, template, out, n_known, movie_col, score_col, dot_col, base)
 *
 * The personalised model's input matrix of one user's batch, written row by row into ``out`` (float64, (m, w)):
 * each row starts as ``template`` (w float64: the user's columns, the same for every movie), takes the movie's
 * six features from ``x6`` ((m, nx) float64) in its first nx columns and row ``rows[i]`` of ``table`` ((R, 4)
 * float64: count, mean, spread, bias) at ``movie_col``; a movie the model knows (rows[i] < n_known) gets
 * cf_dot = factors[rows[i]] . user_factors (factors (n_known, d) float64, summed in order) and cf_score =
 * (base + bias) + cf_dot, where base is the global mean plus the user's bias; any other movie gets NaN for both
 * (its table bias is NaN). The twin is inputs.model_inputs (tests/runtime/test_native.py compares them): in
 * numpy, a gather, a matmul and a dozen column writes, each a pass over the batch; here it is one. */
static PyObject *user_rows(PyObject *self, PyObject *args) {
    Py_buffer rows, x6, table, factors, uf, tmpl, out;
    Py_ssize_t n_known, movie_col, score_col, dot_col;
    double base;
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*w*nnnnd", &rows, &x6, &table, &factors, &uf, &tmpl, &out, &n_known,
                          &movie_col, &score_col, &dot_col, &base))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t m = rows.len / 8, w = tmpl.len / 8, d = uf.len / 8, n_table = table.len / 32;
    const Py_ssize_t nx = m ? x6.len / 8 / m : 0;
    if (rows.len % 8 || tmpl.len % 8 || uf.len % 8 || table.len % 32 || out.len != m * w * 8 ||
        (m && x6.len != m * nx * 8) || nx > w || movie_col < 0 || movie_col + 4 > w || score_col < 0 ||
        score_col >= w || dot_col < 0 || dot_col >= w || n_known < 0 || n_known > n_table ||
        factors.len != n_known * d * 8) {
        PyErr_SetString(PyExc_ValueError, "user_rows: arrays of inconsistent shapes");
        goto done;
    }
    const long long *r = (const long long *)rows.buf;
    const double *xs = (const double *)x6.buf, *tb = (const double *)table.buf, *fs = (const double *)factors.buf;
    const double *u = (const double *)uf.buf, *t0 = (const double *)tmpl.buf;
    double *o = (double *)out.buf;
    for (Py_ssize_t i = 0; i < m; i++) {
        if (r[i] < 0 || r[i] >= n_table) {
            PyErr_SetString(PyExc_ValueError, "user_rows: a row outside the table");
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < m; i++) {
        double *row = o + i * w;
        const double *mv = tb + r[i] * 4;
        memcpy(row, t0, (size_t)w * 8);
        memcpy(row, xs + i * nx, (size_t)nx * 8);
        memcpy(row + movie_col, mv, 4 * 8);
        double dot = NAN;
        if (r[i] < n_known) {
            const double *f = fs + r[i] * d;
            dot = 0.0;
            for (Py_ssize_t j = 0; j < d; j++) dot += f[j] * u[j];
        }
        row[dot_col] = dot;
        row[score_col] = (base + mv[3]) + dot;
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&rows);
    PyBuffer_Release(&x6);
    PyBuffer_Release(&table);
    PyBuffer_Release(&factors);
    PyBuffer_Release(&uf);
    PyBuffer_Release(&tmpl);
    PyBuffer_Release(&out);
    return result;
}

/* The fold-in: w = [bias, p_1..p_k] solving (sum_i x_i x_i^T + D) w = sum_i x_i e_i over the m rated movies the
 * model knows, x_i = [1, q_i] (q_i = row cols[i] of q, (n_movies, k)), D = diag(reg_bias * m + damping,
 * reg_factors * m, ...): the ALS user step (native.view_data_py is the Python twin), built and solved by Cholesky
 * (the matrix is symmetric positive definite whenever the ridge terms are positive; a general solver's call costs
 * several times this whole small system). ``work`` holds (k + 1)^2 + (k + 1) doubles, zeroed. Returns 1, or 0
 * when the matrix is not positive definite. */
static int solve_ridge(const double *q, Py_ssize_t k, const Py_ssize_t *cols, const double *e, Py_ssize_t m,
                       double reg_f, double reg_b, double damping, double *w, double *work) {
    const Py_ssize_t d = k + 1;
    double *a = work, *rhs = work + d * d;
    for (Py_ssize_t i = 0; i < m; i++) {
        const double *qi = q + cols[i] * k;
        /* x = [1, qi]: the lower triangle of x x^T, and x * e */
        a[0] += 1.0;
        rhs[0] += e[i];
        for (Py_ssize_t r = 1; r < d; r++) {
            const double xr = qi[r - 1];
            double *row = a + r * d;
            row[0] += xr;
            for (Py_ssize_t c = 1; c <= r; c++) row[c] += xr * qi[c - 1];
            rhs[r] += xr * e[i];
        }
    }
    a[0] += reg_b * (double)m + damping;
    for (Py_ssize_t r = 1; r < d; r++) a[r * d + r] += reg_f * (double)m;
    /* Cholesky, in place in the lower triangle: a = L L^T. */
    for (Py_ssize_t j = 0; j < d; j++) {
        double diag = a[j * d + j];
        for (Py_ssize_t p = 0; p < j; p++) diag -= a[j * d + p] * a[j * d + p];
        if (!(diag > 0.0)) return 0;
        diag = sqrt(diag);
        a[j * d + j] = diag;
        for (Py_ssize_t i = j + 1; i < d; i++) {
            double v = a[i * d + j];
            for (Py_ssize_t p = 0; p < j; p++) v -= a[i * d + p] * a[j * d + p];
            a[i * d + j] = v / diag;
        }
    }
    /* L y = rhs, then L^T w = y. */
    for (Py_ssize_t i = 0; i < d; i++) {
        double v = rhs[i];
        for (Py_ssize_t p = 0; p < i; p++) v -= a[i * d + p] * w[p];
        w[i] = v / a[i * d + i];
    }
    for (Py_ssize_t i = d - 1; i >= 0; i--) {
        double v = w[i];
        for (Py_ssize_t p = i + 1; p < d; p++) v -= a[p * d + i] * w[p];
        w[i] = v / a[i * d + i];
    }
    return 1;
}

/* view_data(factors, k, item_bias, mu, cols, ratings, times, reg_factors, reg_bias, damping, recent)
 *     -> (bytes, n_recent) | None
 *
 * Everything a personalised model's UserView holds, from a user's ratings (data scale; one per movie, in arrival
 * order): ``cols`` their movies' rows in ``factors`` / ``item_bias`` (-1: a movie the model does not know),
 * ``times`` their timestamps. The bytes are UserView's array: count, mean, spread (population standard
 * deviation), w (solve_ridge over the known movies; zeros if none), two NaN places for the tail's residual means
 * (the caller fills them, with math.fsum), then the times and residuals r - mu - bias (r - mu for an unknown movie)
 * of the ``recent`` latest ratings by time, ascending, arrival order among equal times (a stable sort's last
 * ones). native.view_data_py is the Python twin; this is a cache miss's work in one call. None when the matrix
 * is not positive definite (native.py then takes the Python way). */
static PyObject *view_data(PyObject *self, PyObject *args) {
    Py_buffer fac, bias;
    Py_ssize_t k, recent;
    double mu, reg_f, reg_b, damping;
    PyObject *cols, *ratings, *times;
    if (!PyArg_ParseTuple(args, "y*ny*dO!O!O!dddn", &fac, &k, &bias, &mu, &PyList_Type, &cols, &PyList_Type, &ratings,
                          &PyList_Type, &times, &reg_f, &reg_b, &damping, &recent))
        return NULL;
    PyObject *result = NULL;
    double *mem = NULL;
    const Py_ssize_t n = PyList_GET_SIZE(cols), d = k + 1;
    const Py_ssize_t n_movies = bias.len / 8;
    if (k < 0 || k > 4096 || bias.len % 8 != 0 || fac.len != n_movies * k * 8 || PyList_GET_SIZE(ratings) != n ||
        PyList_GET_SIZE(times) != n || n < 1 || recent < 1) {
        PyErr_SetString(PyExc_ValueError, "view_data: arrays of inconsistent shapes");
        goto done;
    }
    const Py_ssize_t nr = n < recent ? n : recent;
    const Py_ssize_t out_len = 3 + d + 2 + 2 * nr;
    /* work: the system (d^2 + d) and w (d), zeroed; per rating r, t, e, the known movies' residuals and rows (as
     * doubles' room); the recent picks; the output */
    mem = PyMem_Calloc((size_t)(d * d + 2 * d + 5 * n + recent + out_len), sizeof(double));
    if (mem == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    double *w = mem + d * d + d, *r = w + d, *t = r + n, *e = t + n, *ek = e + n;
    Py_ssize_t *known = (Py_ssize_t *)(ek + n), *pick = known + n;
    double *out = (double *)(pick + recent);
    const double *ib = (const double *)bias.buf;
    Py_ssize_t m = 0; /* the known movies: their rows (known) and residuals (ek), in order */
    double total = 0.0, total_sq = 0.0;
    for (Py_ssize_t i = 0; i < n; i++) {
        const Py_ssize_t c = PyLong_AsSsize_t(PyList_GET_ITEM(cols, i));
        if (c == -1 && PyErr_Occurred()) goto done;
        r[i] = PyFloat_AsDouble(PyList_GET_ITEM(ratings, i));
        if (r[i] == -1.0 && PyErr_Occurred()) goto done;
        t[i] = PyFloat_AsDouble(PyList_GET_ITEM(times, i));
        if (t[i] == -1.0 && PyErr_Occurred()) goto done;
        if (c < -1 || c >= n_movies) {
            PyErr_SetString(PyExc_ValueError, "view_data: a movie outside factors");
            goto done;
        }
        e[i] = c >= 0 ? r[i] - mu - ib[c] : r[i] - mu;
        if (c >= 0) {
            known[m] = c;
            ek[m++] = e[i];
        }
        total += r[i];
        total_sq += r[i] * r[i];
    }
    if (m > 0 && !solve_ridge((const double *)fac.buf, k, known, ek, m, reg_f, reg_b, damping, w, mem)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* The latest ``recent`` by (time, arrival), ascending: a short list kept sorted. Ratings come in arrival
     * order, so a rating is later than every pick of the same time; one older than the oldest pick is skipped. */
    Py_ssize_t np_ = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t pos;
        if (np_ < nr) {
            pos = np_++;
        } else {
            if (t[i] < t[pick[0]]) continue;
            memmove(pick, pick + 1, (size_t)(nr - 1) * sizeof(Py_ssize_t)); /* the oldest pick goes */
            pos = nr - 1;
        }
        while (pos > 0 && t[pick[pos - 1]] > t[i]) {
            pick[pos] = pick[pos - 1];
            pos--;
        }
        pick[pos] = i;
    }
    const double count = (double)n, mean = total / count;
    const double spread = total_sq / count - mean * mean;
    out[0] = count;
    out[1] = mean;
    out[2] = sqrt(spread > 0.0 ? spread : 0.0);
    memcpy(out + 3, w, (size_t)d * sizeof(double));
    out[3 + d] = out[4 + d] = NAN;
    for (Py_ssize_t j = 0; j < nr; j++) {
        out[5 + d + j] = t[pick[j]];
        out[5 + d + nr + j] = e[pick[j]];
    }
    result = Py_BuildValue("(y#n)", (const char *)out, (Py_ssize_t)(out_len * sizeof(double)), nr);
done:
    PyMem_Free(mem);
    PyBuffer_Release(&fac);
    PyBuffer_Release(&bias);
    return result;
}

static PyMethodDef codec_methods[] = {
    {"positions", positions, METH_VARARGS,
     "positions(keys, index, default, out, dense=None, complete=False): index.get(key, default) into int64; returns "
     "the non-int keys."},
    {"view_data", view_data, METH_VARARGS, "view_data(...): a UserView's array from a user's ratings."},
    {"user_rows", user_rows, METH_VARARGS, "user_rows(...): the personalised model's input matrix of one user's batch."},
    {"rows", rows, METH_VARARGS, "rows(ids, ratings, order, source, sources, prefix): the JSON of a batch's rows."},
    {"matrix", matrix, METH_VARARGS, "matrix(movies, names, out): the attributes of every movie into a float64 buffer."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef codec_module = {
    PyModuleDef_HEAD_INIT, .m_name = "moviematch_ml.runtime._codec",
    .m_doc = "C loops of /predict-batch: the feature matrix and the answer's rows.", .m_size = -1,
    .m_methods = codec_methods,
};

PyMODINIT_FUNC PyInit__codec(void) { return PyModule_Create(&codec_module); }
