/* service._rankjson: the /rank JSON in C, both ways: the candidates (list or column form) scanned from the body's
 * bytes into columns, and the response's items spliced from JSON arrays.
 *
 * scan(body, max_id) -> None | (start, end, item_ids, ids_checked, names, columns, kinds, columnar)
 *
 * The body is a JSON object whose "candidates" value is either an array of objects {"item_id": ..., "features":
 * {name: value}} (the list form) or one object {"item_id": [...], "features": {name: [...]}} (the column form,
 * columnar True). When every candidate of the list form sends the same feature names in the same order (the usual
 * body), or every column of the column form is as long as the item ids, the candidates are read in one pass with no
 * Python object per candidate or per value:
 *
 *   start, end  the byte span of the "candidates" value (the caller parses the rest of the body: a few options);
 *   item_ids    bytes: a JSON array of the candidates' item_id values, as written in the body;
 *   ids_checked True when every item_id is a string without escapes of 1 to max_id characters (counted as
 *               UTF-8 sequences: exact for the valid UTF-8 the caller's decoder then requires), so the caller
 *               need not check them again; False says nothing (the caller checks);
 *   names       bytes: a JSON array of the feature names, in the order the candidates send them;
 *   columns     one per name: a bytearray of n native int64 when every value is an integer literal within
 *               (-2**63, 2**63), else bytes: a JSON array of the values as written;
 *   kinds       bytes, one per column: 'i' (the int64 bytearray), 'f' (JSON text whose every value is a number
 *               literal with a fraction or an exponent: floats for any JSON decoder) or 'j' (any other JSON text).
 *
 * JSON syntax is checked everywhere (the JSON arrays handed back hold valid JSON text apart from UTF-8 validity,
 * which their decoder checks); the values' types and limits are not: the caller decodes the arrays (orjson) and
 * holds them to its rules. None means "not this scanner's case", never "invalid": the caller then takes its general
 * path, which gives the verdict. None comes for invalid JSON, no candidates, an escaped top-level key or candidate
 * key, a candidate key (the column form: a key of the candidates object) other than item_id and features or one of
 * them missing or repeated, a candidate whose feature names are not exactly the first candidate's in the same order
 * (raw bytes compared), a feature column that is not an array or not as long as the item ids, a name repeated (raw
 * bytes), an escaped name, nesting deeper than MAX_DEPTH.
 *
 * The pass touches no Python object and runs with the GIL released (the inference threads run meanwhile); the
 * result is built after it.
 *
 * splice(segments, arrays) -> bytes
 *
 * k JSON arrays of n elements each (orjson's output: ids, ranks, scores) and k + 1 byte segments give the JSON array
 * of n items "[S0 A0[i] S1 A1[i] ... Sk, ...]": item i is the segments with the i-th element of each array between
 * them. ValueError when an array is not a JSON array or their lengths differ.
 *
 * Tests: tests/service/test_rankjson.py (with a fuzz of mutated bodies) and tests/service/test_rank_response.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 64

typedef struct {
    const char *p, *end;
} Cur;

static inline void skip_ws(Cur *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\n' || *c->p == '\r' || *c->p == '\t'))
        c->p++;
}

/* Consume `ch` after whitespace; 0 when the next byte is something else. */
static inline int expect(Cur *c, char ch) {
    skip_ws(c);
    if (c->p < c->end && *c->p == ch) {
        c->p++;
        return 1;
    }
    return 0;
}

static inline int is_digit(char ch) { return ch >= '0' && ch <= '9'; }

static inline int is_hex(char ch) {
    return is_digit(ch) || (ch >= 'a' && ch <= 'f') || (ch >= 'A' && ch <= 'F');
}

/* A string at c->p ('"'): its raw bytes [*s, *s + *len) between the quotes; *escaped when it holds a backslash
 * escape (then the raw bytes are not the value). 0 on a JSON syntax error (control character, bad escape, no end). */
static int scan_string(Cur *c, const char **s, Py_ssize_t *len, int *escaped) {
    const char *p = c->p + 1;
    *escaped = 0;
    *s = p;
    while (p < c->end) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '"') {
            *len = p - *s;
            c->p = p + 1;
            return 1;
        }
        if (ch < 0x20)
            return 0;
        if (ch == '\\') {
            *escaped = 1;
            if (++p >= c->end)
                return 0;
            switch (*p) {
            case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r': case 't':
                p++;
                break;
            case 'u':
                if (c->end - p < 5 || !is_hex(p[1]) || !is_hex(p[2]) || !is_hex(p[3]) || !is_hex(p[4]))
                    return 0;
                p += 5;
                break;
            default:
                return 0;
            }
            continue;
        }
        p++;
    }
    return 0;
}

/* A number at c->p by the JSON grammar: its span, and whether it has a fraction or exponent. 0 on a syntax error. */
static int scan_number(Cur *c, const char **s, Py_ssize_t *len, int *is_float) {
    const char *p = c->p, *end = c->end;
    *s = p;
    *is_float = 0;
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return 0;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (p < end && is_digit(*p))
            p++;
    else
        return 0;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || !is_digit(*p))
            return 0;
        while (p < end && is_digit(*p))
            p++;
        *is_float = 1;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || !is_digit(*p))
            return 0;
        while (p < end && is_digit(*p))
            p++;
        *is_float = 1;
    }
    *len = p - *s;
    c->p = p;
    return 1;
}

/* An integer literal (grammar already checked) into *out; 0 when outside (-2**63, 2**63). */
static int int_value(const char *s, Py_ssize_t len, int64_t *out) {
    int neg = (*s == '-');
    Py_ssize_t digits = len - neg;
    uint64_t v = 0;
    if (digits > 20)
        return 0;
    for (Py_ssize_t i = neg; i < len - (digits == 20); i++) /* at most 19 digits: no overflow */
        v = v * 10 + (uint64_t)(s[i] - '0');
    if (digits == 20) {
        uint64_t d = (uint64_t)(s[len - 1] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return 0;
        v = v * 10 + d;
    }
    if (v > (uint64_t)INT64_MAX) /* -2**63 too: such a column goes back as text, its decoder decides */
        return 0;
    *out = neg ? -(int64_t)v : (int64_t)v;
    return 1;
}

static int literal(Cur *c, const char *word, Py_ssize_t n) {
    if (c->end - c->p < n || memcmp(c->p, word, (size_t)n) != 0)
        return 0;
    c->p += n;
    return 1;
}

/* Any JSON value at c->p (after whitespace), checked for syntax only. */
static int skip_value(Cur *c, int depth) {
    const char *s;
    Py_ssize_t len;
    int flag;
    skip_ws(c);
    if (c->p >= c->end || depth > MAX_DEPTH)
        return 0;
    switch (*c->p) {
    case '"':
        return scan_string(c, &s, &len, &flag);
    case 't':
        return literal(c, "true", 4);
    case 'f':
        return literal(c, "false", 5);
    case 'n':
        return literal(c, "null", 4);
    case '[':
        c->p++;
        if (expect(c, ']'))
            return 1;
        do {
            if (!skip_value(c, depth + 1))
                return 0;
        } while (expect(c, ','));
        return expect(c, ']');
    case '{':
        c->p++;
        if (expect(c, '}'))
            return 1;
        do {
            skip_ws(c);
            if (c->p >= c->end || *c->p != '"' || !scan_string(c, &s, &len, &flag) || !expect(c, ':') ||
                !skip_value(c, depth + 1))
                return 0;
        } while (expect(c, ','));
        return expect(c, '}');
    default:
        return scan_number(c, &s, &len, &flag);
    }
}

typedef struct {
    const char *s;
    Py_ssize_t len;
} Span;

/* One feature's values over the candidates: every value's span, int64 while every value is an integer, and whether
 * every value so far is a float literal (a number with a fraction or an exponent). */
typedef struct {
    Span name; /* raw bytes between the quotes */
    Span *values;
    int64_t *ints;
    int all_int, all_float;
    Py_ssize_t cap, count; /* room in values and ints; values read (the column form: each column counts its own) */
} Column;

typedef struct {
    Column *cols;
    Py_ssize_t ncols, cap_cols;
    Span *ids;
    Py_ssize_t n, cap_n; /* candidates read; capacity of ids (the list form: of every column's arrays too) */
    Py_ssize_t max_id;   /* the longest item_id (characters) that ids_checked vouches for */
    int ids_checked;     /* every item_id so far a string without escapes of 1 to max_id characters */
    int columnar;        /* the candidates came as columns (an object), not as a list of objects */
} Scan;

static void scan_free(Scan *sc) {
    for (Py_ssize_t j = 0; j < sc->ncols; j++) {
        PyMem_RawFree(sc->cols[j].values);
        PyMem_RawFree(sc->cols[j].ints);
    }
    PyMem_RawFree(sc->cols);
    PyMem_RawFree(sc->ids);
}

static int resize(Column *col, Py_ssize_t cap) {
    Span *values = PyMem_RawRealloc(col->values, (size_t)cap * sizeof(Span));
    if (values == NULL)
        return 0;
    col->values = values;
    int64_t *ints = PyMem_RawRealloc(col->ints, (size_t)cap * sizeof(int64_t));
    if (ints == NULL)
        return 0;
    col->ints = ints;
    col->cap = cap;
    return 1;
}

/* Room for item id sc->n. 0 when out of memory. */
static int grow_ids(Scan *sc) {
    if (sc->n < sc->cap_n)
        return 1;
    Py_ssize_t cap = sc->cap_n ? 2 * sc->cap_n : 64;
    Span *ids = PyMem_RawRealloc(sc->ids, (size_t)cap * sizeof(Span));
    if (ids == NULL)
        return 0;
    sc->ids = ids;
    sc->cap_n = cap;
    return 1;
}

/* Room for candidate sc->n in ids and every column (the list form). 0 when out of memory. */
static int grow(Scan *sc) {
    if (sc->n < sc->cap_n)
        return 1;
    if (!grow_ids(sc))
        return 0;
    for (Py_ssize_t j = 0; j < sc->ncols; j++)
        if (!resize(&sc->cols[j], sc->cap_n))
            return 0;
    return 1;
}

/* Any JSON value at c->p, its span into *out (whitespace skipped first). 0 on a syntax error. */
static int value_span(Cur *c, Span *out, int depth) {
    skip_ws(c);
    out->s = c->p;
    if (!skip_value(c, depth))
        return 0;
    out->len = c->p - out->s;
    return 1;
}

/* One feature value of candidate k into `col` (room for it made). 0 on a syntax error. */
static int scan_value(Cur *c, Column *col, Py_ssize_t k) {
    skip_ws(c);
    if (c->p < c->end && (*c->p == '-' || is_digit(*c->p))) {
        Span *v = &col->values[k];
        int is_float;
        if (!scan_number(c, &v->s, &v->len, &is_float))
            return 0;
        if (col->all_int && (is_float || !int_value(v->s, v->len, &col->ints[k])))
            col->all_int = 0;
        col->all_float &= is_float;
        return 1;
    }
    col->all_int = col->all_float = 0;
    return value_span(c, &col->values[k], 3);
}

/* A new name for the first candidate. 1 taken, 0 not this scanner's case, -1 out of memory. */
static int add_name(Scan *sc, const char *s, Py_ssize_t len) {
    for (Py_ssize_t j = 0; j < sc->ncols; j++)
        if (sc->cols[j].name.len == len && memcmp(sc->cols[j].name.s, s, (size_t)len) == 0)
            return 0; /* a duplicate name: the general path decides which value counts */
    if (sc->ncols == sc->cap_cols) {
        Py_ssize_t cap = sc->cap_cols ? 2 * sc->cap_cols : 32;
        Column *cols = PyMem_RawRealloc(sc->cols, (size_t)cap * sizeof(Column));
        if (cols == NULL)
            return -1;
        sc->cols = cols;
        sc->cap_cols = cap;
    }
    Column *col = &sc->cols[sc->ncols++];
    *col = (Column){{s, len}, NULL, NULL, 1, 1, 0, 0};
    if (!resize(col, sc->cap_n))
        return -1;
    return 1;
}

/* A key at c->p (after whitespace) and its colon: raw bytes into *key. 0 on a syntax error or an escaped key. */
static int scan_key(Cur *c, Span *key) {
    int escaped;
    skip_ws(c);
    return c->p < c->end && *c->p == '"' && scan_string(c, &key->s, &key->len, &escaped) && !escaped &&
           expect(c, ':');
}

static int key_is(Span key, const char *word) {
    size_t n = strlen(word);
    return (size_t)key.len == n && memcmp(key.s, word, n) == 0;
}

/* The "features" object of candidate sc->n. 1 taken, 0 not this scanner's case, -1 out of memory. */
static int scan_features(Scan *sc, Cur *c) {
    Span key;
    Py_ssize_t j = 0;
    int r = 0;
    if (!expect(c, '{'))
        return 0;
    if (expect(c, '}'))
        return sc->ncols == 0;
    do {
        if (sc->n == 0) {
            if (!scan_key(c, &key) || (r = add_name(sc, key.s, key.len)) != 1)
                return r == -1 ? -1 : 0;
        } else { /* the first candidate's j-th name, byte for byte (bytes scan_string accepted there) */
            skip_ws(c);
            if (j >= sc->ncols)
                return 0;
            Span name = sc->cols[j].name;
            if (c->end - c->p < name.len + 2 || c->p[0] != '"' || c->p[name.len + 1] != '"' ||
                memcmp(c->p + 1, name.s, (size_t)name.len) != 0)
                return 0; /* not the first candidate's names in its order */
            c->p += name.len + 2;
            if (!expect(c, ':'))
                return 0;
        }
        if (!scan_value(c, &sc->cols[j], sc->n))
            return 0;
        j++;
    } while (expect(c, ','));
    return expect(c, '}') && j == sc->ncols;
}

/* A candidate's item_id into *out (its span, quotes included for a string), clearing sc->ids_checked unless it
 * is a string without escapes of 1 to sc->max_id characters. 0 on a syntax error. */
static int scan_id(Scan *sc, Cur *c, Span *out) {
    const char *s;
    Py_ssize_t len, chars = 0;
    int escaped;
    skip_ws(c);
    if (c->p >= c->end || *c->p != '"') {
        sc->ids_checked = 0;
        return value_span(c, out, 3);
    }
    out->s = c->p;
    if (!scan_string(c, &s, &len, &escaped))
        return 0;
    out->len = c->p - out->s;
    if (sc->ids_checked) {
        for (Py_ssize_t i = 0; i < len; i++) /* characters: bytes that do not continue a UTF-8 sequence */
            chars += ((unsigned char)s[i] & 0xC0) != 0x80;
        if (escaped || chars < 1 || chars > sc->max_id)
            sc->ids_checked = 0;
    }
    return 1;
}

/* An object whose keys are "item_id" and "features", each once, in either order: their values read by `ids` and
 * `features`. 1 taken, 0 not this scanner's case, -1 out of memory. */
static int scan_id_and_features(Scan *sc, Cur *c, int (*ids)(Scan *, Cur *), int (*features)(Scan *, Cur *)) {
    Span key;
    int r, have_id = 0, have_features = 0;
    if (!expect(c, '{'))
        return 0;
    do {
        if (!scan_key(c, &key))
            return 0;
        if (key_is(key, "item_id") && !have_id) {
            have_id = 1;
            r = ids(sc, c);
        } else if (key_is(key, "features") && !have_features) {
            have_features = 1;
            r = features(sc, c);
        } else {
            return 0;
        }
        if (r != 1)
            return r;
    } while (expect(c, ','));
    return expect(c, '}') && have_id && have_features;
}

static int scan_candidate_id(Scan *sc, Cur *c) { return scan_id(sc, c, &sc->ids[sc->n]); }

/* One candidate object. 1 taken, 0 not this scanner's case, -1 out of memory. */
static int scan_candidate(Scan *sc, Cur *c) {
    int r;
    if (!grow(sc))
        return -1;
    if ((r = scan_id_and_features(sc, c, scan_candidate_id, scan_features)) != 1)
        return r;
    sc->n++;
    return 1;
}

/* The candidates array. 1 taken, 0 not this scanner's case, -1 out of memory. */
static int scan_candidates(Scan *sc, Cur *c) {
    int r;
    if (!expect(c, '[') || expect(c, ']'))
        return 0;
    do {
        if ((r = scan_candidate(sc, c)) != 1)
            return r;
    } while (expect(c, ','));
    return expect(c, ']');
}

/* The column form's item_id array: every id into sc->ids (sc->n counts them). 1 taken, 0 not this scanner's case, -1
 * out of memory. */
static int scan_id_column(Scan *sc, Cur *c) {
    if (!expect(c, '[') || expect(c, ']'))
        return 0; /* no candidates: the general path answers */
    do {
        if (!grow_ids(sc))
            return -1;
        if (!scan_id(sc, c, &sc->ids[sc->n]))
            return 0;
        sc->n++;
    } while (expect(c, ','));
    return expect(c, ']');
}

/* The column form's features object: each name's array of values into a column of its own. 1 taken, 0 not this
 * scanner's case, -1 out of memory. */
static int scan_feature_columns(Scan *sc, Cur *c) {
    Span key;
    int r;
    if (!expect(c, '{'))
        return 0;
    if (expect(c, '}'))
        return 1;
    do {
        if (!scan_key(c, &key) || (r = add_name(sc, key.s, key.len)) != 1)
            return r == -1 ? -1 : 0;
        Column *col = &sc->cols[sc->ncols - 1];
        if (!expect(c, '['))
            return 0;
        if (!expect(c, ']')) {
            do {
                if (col->count == col->cap && !resize(col, col->cap ? 2 * col->cap : 64))
                    return -1;
                if (!scan_value(c, col, col->count))
                    return 0;
                col->count++;
            } while (expect(c, ','));
            if (!expect(c, ']'))
                return 0;
        }
    } while (expect(c, ','));
    return expect(c, '}');
}

/* The candidates as columns: {"item_id": [...], "features": {name: [...]}}, every column as long as the ids. 1
 * taken, 0 not this scanner's case, -1 out of memory. */
static int scan_columns(Scan *sc, Cur *c) {
    int r;
    sc->columnar = 1;
    if ((r = scan_id_and_features(sc, c, scan_id_column, scan_feature_columns)) != 1)
        return r;
    for (Py_ssize_t j = 0; j < sc->ncols; j++)
        if (sc->cols[j].count != sc->n)
            return 0; /* a column of another length: the general path names it */
    return 1;
}

/* bytes: the JSON array "[v0,v1,...]" of n spans; `quoted`: each span wrapped in double quotes. */
static PyObject *json_array(const Span *spans, Py_ssize_t n, int quoted) {
    Py_ssize_t size = 2 + (n > 0 ? n - 1 : 0);
    for (Py_ssize_t i = 0; i < n; i++)
        size += spans[i].len + 2 * quoted;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    *p++ = '[';
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        if (quoted)
            *p++ = '"';
        memcpy(p, spans[i].s, (size_t)spans[i].len);
        p += spans[i].len;
        if (quoted)
            *p++ = '"';
    }
    *p = ']';
    return out;
}

/* The result tuple from a completed scan. */
static PyObject *result(Scan *sc, Py_ssize_t start, Py_ssize_t end) {
    PyObject *ids = NULL, *names = NULL, *columns = NULL, *kinds = NULL;
    Span *name_spans = PyMem_Malloc((size_t)(sc->ncols ? sc->ncols : 1) * sizeof(Span));
    if (name_spans == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < sc->ncols; j++)
        name_spans[j] = sc->cols[j].name;
    names = json_array(name_spans, sc->ncols, 1);
    PyMem_Free(name_spans);
    ids = json_array(sc->ids, sc->n, 0);
    columns = PyList_New(sc->ncols);
    kinds = PyBytes_FromStringAndSize(NULL, sc->ncols);
    if (names == NULL || ids == NULL || columns == NULL || kinds == NULL)
        goto fail;
    for (Py_ssize_t j = 0; j < sc->ncols; j++) {
        Column *col = &sc->cols[j];
        PyBytes_AS_STRING(kinds)[j] = col->all_int ? 'i' : col->all_float ? 'f' : 'j';
        PyObject *v = col->all_int
            ? PyByteArray_FromStringAndSize((const char *)col->ints, sc->n * (Py_ssize_t)sizeof(int64_t))
            : json_array(col->values, sc->n, 0);
        if (v == NULL)
            goto fail;
        PyList_SET_ITEM(columns, j, v);
    }
    return Py_BuildValue("(nnNONNNO)", start, end, ids, sc->ids_checked ? Py_True : Py_False, names, columns, kinds,
                         sc->columnar ? Py_True : Py_False);
fail:
    Py_XDECREF(ids);
    Py_XDECREF(names);
    Py_XDECREF(columns);
    Py_XDECREF(kinds);
    return NULL;
}

/* The top-level object: finds and reads the candidates (sets *start, *end). 1 taken, 0 not this scanner's case, -1
 * out of memory. Touches no Python object: it runs without the GIL. */
static int scan_body(Scan *sc, const char *body, Py_ssize_t size, Py_ssize_t *start, Py_ssize_t *end) {
    Cur c = {body, body + size};
    Span key;
    int r;
    *start = -1;
    if (!expect(&c, '{') || expect(&c, '}'))
        return 0;
    do {
        if (!scan_key(&c, &key)) /* an escaped key might spell "candidates" */
            return 0;
        if (key_is(key, "candidates")) {
            if (*start >= 0)
                return 0; /* twice: the general path keeps the last */
            skip_ws(&c);
            *start = c.p - body;
            if ((r = c.p < c.end && *c.p == '{' ? scan_columns(sc, &c) : scan_candidates(sc, &c)) != 1)
                return r;
            *end = c.p - body;
        } else if (!skip_value(&c, 1)) {
            return 0;
        }
    } while (expect(&c, ','));
    if (!expect(&c, '}') || *start < 0)
        return 0;
    skip_ws(&c);
    return c.p == c.end;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *arg;
    Py_ssize_t max_id;
    if (!PyArg_ParseTuple(args, "O!n:scan", &PyBytes_Type, &arg, &max_id)) /* bytes: immutable, safe without the GIL */
        return NULL;
    const char *body = PyBytes_AS_STRING(arg);
    Py_ssize_t size = PyBytes_GET_SIZE(arg), start = -1, end = -1;
    Scan sc = {0};
    sc.max_id = max_id;
    sc.ids_checked = 1;
    PyObject *out = NULL;
    int r;
    Py_BEGIN_ALLOW_THREADS
    r = scan_body(&sc, body, size, &start, &end);
    Py_END_ALLOW_THREADS
    if (r == 1)
        out = result(&sc, start, end); /* NULL: an error set */
    else if (r == 0)
        out = Py_NewRef(Py_None);
    else
        PyErr_NoMemory();
    scan_free(&sc);
    return out;
}

/* The spans of a JSON array's elements (*out: PyMem_Malloc'ed, *n of them). 0 when `text` is not a JSON array, or
 * out of memory (then the error is set). */
static int elements(const char *text, Py_ssize_t size, Span **out, Py_ssize_t *n) {
    Cur c = {text, text + size};
    Py_ssize_t cap = 64;
    *n = 0;
    *out = PyMem_Malloc((size_t)cap * sizeof(Span));
    if (*out == NULL) {
        PyErr_NoMemory();
        return 0;
    }
    if (!expect(&c, '['))
        return 0;
    if (!expect(&c, ']')) {
        do {
            if (*n == cap) {
                cap *= 2;
                Span *grown = PyMem_Realloc(*out, (size_t)cap * sizeof(Span));
                if (grown == NULL) {
                    PyErr_NoMemory();
                    return 0;
                }
                *out = grown;
            }
            if (!value_span(&c, &(*out)[(*n)++], 1))
                return 0;
        } while (expect(&c, ','));
        if (!expect(&c, ']'))
            return 0;
    }
    skip_ws(&c);
    return c.p == c.end;
}

static PyObject *splice(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *segments, *arrays, *out = NULL;
    if (!PyArg_ParseTuple(args, "O!O!:splice", &PyTuple_Type, &segments, &PyTuple_Type, &arrays))
        return NULL;
    Py_ssize_t k = PyTuple_GET_SIZE(arrays), n = 0, size = 0, fixed = 0;
    if (PyTuple_GET_SIZE(segments) != k + 1)
        return PyErr_Format(PyExc_ValueError, "splice: %zd segments for %zd arrays (one more expected)",
                            PyTuple_GET_SIZE(segments), k);
    for (Py_ssize_t j = 0; j <= k; j++) {
        PyObject *b = PyTuple_GET_ITEM(segments, j);
        if (!PyBytes_Check(b) || (j < k && !PyBytes_Check(PyTuple_GET_ITEM(arrays, j))))
            return PyErr_Format(PyExc_TypeError, "splice: segments and arrays are bytes");
        fixed += PyBytes_GET_SIZE(b);
    }
    Span **el = PyMem_Calloc((size_t)(k ? k : 1), sizeof(Span *));
    if (el == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t j = 0; j < k; j++) {
        PyObject *a = PyTuple_GET_ITEM(arrays, j);
        Py_ssize_t m;
        if (!elements(PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a), &el[j], &m)) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "splice: array %zd is not a JSON array", j);
            goto done;
        }
        if (j > 0 && m != n) {
            PyErr_Format(PyExc_ValueError, "splice: array %zd has %zd elements, array 0 has %zd", j, m, n);
            goto done;
        }
        n = m;
        size += PyBytes_GET_SIZE(a);
    }
    out = PyBytes_FromStringAndSize(NULL, 2 + n * fixed + size + (n > 0 ? n - 1 : 0));
    if (out == NULL)
        goto done;
    char *p = PyBytes_AS_STRING(out);
    *p++ = '[';
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i)
            *p++ = ',';
        for (Py_ssize_t j = 0; j <= k; j++) {
            PyObject *seg = PyTuple_GET_ITEM(segments, j);
            memcpy(p, PyBytes_AS_STRING(seg), (size_t)PyBytes_GET_SIZE(seg));
            p += PyBytes_GET_SIZE(seg);
            if (j < k) {
                memcpy(p, el[j][i].s, (size_t)el[j][i].len);
                p += el[j][i].len;
            }
        }
    }
    *p++ = ']';
    if (_PyBytes_Resize(&out, p - PyBytes_AS_STRING(out)) < 0) /* the arrays' commas and brackets are not copied */
        out = NULL;
done:
    for (Py_ssize_t j = 0; j < k; j++)
        PyMem_Free(el[j]);
    PyMem_Free(el);
    return out;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_VARARGS,
     "scan(body, max_id) -> None | (start, end, item_ids, ids_checked, names, columns, kinds): the /rank list "
     "form's candidates as columns "
     "(the contract is at the top of service/_rankjson.c)."},
    {"splice", splice, METH_VARARGS,
     "splice(segments, arrays) -> bytes: the JSON array of items, item i being the segments with the i-th element "
     "of each JSON array between them (see service/_rankjson.c)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rankjson", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rankjson(void) { return PyModule_Create(&module); }
