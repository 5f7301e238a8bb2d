/*
 * gateway.control._fastloop: the 1 kHz control loop on a native thread.
 *
 * The Kernel object owns the shared memory between Python and the thread:
 * inputs and parameters behind seqlocks written from Python, the published
 * setpoints behind a seqlock written by the thread, the SPSC ring of tick
 * records, and atomic health counters. The thread never calls the Python
 * API, so it never takes the GIL. gateway/control/loop.py wraps this object;
 * use that, not this module, from the rest of the daemon.
 *
 * Timing: the thread wakes on absolute CLOCK_MONOTONIC deadlines. It sleeps
 * with clock_nanosleep(TIMER_ABSTIME) until spin_ns before the deadline and
 * spins on the clock for the rest. A tick that ends after the next deadline
 * skips the deadlines it overran; each skipped one counts as missed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include "fl_law.h"
#include "fl_sync.h"

/* Stack of the loop thread: the law and the seqlock copies use well under 64 kB. */
#define LOOP_STACK_BYTES (256 * 1024)

/* Tries before the thread gives up on a snapshot and reuses the last one. A
 * copy takes well under a microsecond, so 64 failed tries mean the writer was
 * preempted in the middle of its copy. */
#define SNAPSHOT_TRIES 64

typedef struct {
    uint64_t tick;
    double setpoint_kw[FL_MAX_UNITS];
    uint8_t enabled[FL_MAX_UNITS];
} fl_outputs;

typedef struct {
    PyObject_HEAD
    int n_units;
    size_t record_size;
    /* Shared with the thread. */
    fl_seqlock inputs;
    fl_seqlock params;
    fl_seqlock outputs;
    fl_ring ring;
    _Atomic int running;
    _Atomic int ready;
    _Atomic uint64_t ticks;
    _Atomic uint64_t missed;
    _Atomic int64_t max_late_ns;
    _Atomic int64_t last_tick_ns;
    _Atomic int64_t stall_ns;
    _Atomic uint64_t snapshot_reuses;
    /* Owned by the thread while it runs, by Python otherwise. */
    fl_state state;
    fl_inputs in_local;
    fl_params par_local;
    uint64_t par_seq_seen;
    uint8_t *scratch_record;
    /* Written by Python only. */
    fl_inputs in_staging;
    uint64_t generation;
    uint64_t steps;
    pthread_t thread;
    int thread_started;
    int64_t period_ns;
    int64_t spin_ns;
    int priority;
    int cpu;
    int locked_memory;
    /* Filled by the thread before it sets ready. */
    int granted_fifo;
    int sched_errno;
    int granted_cpu;
    int affinity_errno;
} KernelObject;

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void sleep_until(int64_t t_ns)
{
    struct timespec ts = {.tv_sec = t_ns / 1000000000LL, .tv_nsec = t_ns % 1000000000LL};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static int seqlock_alloc(fl_seqlock *lock, size_t n_bytes)
{
    lock->n_words = n_bytes / 8;
    lock->words = calloc(lock->n_words, sizeof(uint64_t));
    atomic_init(&lock->seq, 0);
    return lock->words != NULL;
}

static size_t inputs_bytes(int n) { return sizeof(fl_site_in) + (size_t)n * sizeof(fl_unit_in); }
static size_t params_bytes(int n) { return sizeof(fl_site_par) + (size_t)n * sizeof(fl_unit_par); }

/* Run one tick on the current snapshot and publish its outputs. Shared by
 * the thread and the deterministic step mode. Returns the record written,
 * which is a ring slot or the scratch record when the ring is full. */
static uint8_t *run_tick(KernelObject *k, int64_t now_ns, uint64_t tick, int to_ring)
{
    uint32_t extra_limits = 0;
    uint64_t par_seq = atomic_load_explicit(&k->params.seq, memory_order_acquire);
    if (par_seq != k->par_seq_seen) {
        fl_params fresh;
        if (fl_seqlock_read(&k->params, &fresh, params_bytes(k->n_units), SNAPSHOT_TRIES)) {
            memcpy(&k->par_local, &fresh, params_bytes(k->n_units));
            k->par_seq_seen = par_seq;
        }
    }
    fl_inputs snapshot;
    if (fl_seqlock_read(&k->inputs, &snapshot, inputs_bytes(k->n_units), SNAPSHOT_TRIES)) {
        memcpy(&k->in_local, &snapshot, inputs_bytes(k->n_units));
    } else {
        /* The last snapshot carries its own timestamps, so the stale
         * interlocks still fire if this goes on. */
        extra_limits = FL_LIMIT_SNAPSHOT_REUSED;
        atomic_fetch_add_explicit(&k->snapshot_reuses, 1, memory_order_relaxed);
    }

    uint8_t *record = to_ring ? fl_ring_reserve(&k->ring) : NULL;
    if (record == NULL) record = k->scratch_record;
    fl_record_head *head = (fl_record_head *)record;
    fl_record_unit *units = (fl_record_unit *)(record + sizeof(fl_record_head));
    fl_outputs out;
    out.tick = tick;
    fl_tick(&k->par_local, k->n_units, &k->state, &k->in_local, now_ns, out.setpoint_kw, out.enabled,
            head, units);
    head->limit_bits |= extra_limits;
    head->tick = tick;
    head->t_ns = now_ns;
    fl_seqlock_write(&k->outputs, &out, sizeof(out));
    return record;
}

static void *loop_main(void *arg)
{
    KernelObject *k = (KernelObject *)arg;

    if (k->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(k->cpu, &set);
        k->affinity_errno = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
        k->granted_cpu = k->affinity_errno == 0;
    }
    if (k->priority > 0) {
        struct sched_param sp = {.sched_priority = k->priority};
        k->sched_errno = pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
        k->granted_fifo = k->sched_errno == 0;
    }
    /* Touch the stack now so that the first ticks do not page-fault. */
    volatile uint8_t prefault[64 * 1024];
    memset((void *)prefault, 0, sizeof(prefault));

    int64_t deadline = mono_ns() + k->period_ns;
    uint64_t tick = 0;
    atomic_store_explicit(&k->ready, 1, memory_order_release);

    while (atomic_load_explicit(&k->running, memory_order_acquire)) {
        if (deadline - k->spin_ns > mono_ns()) sleep_until(deadline - k->spin_ns);
        int64_t now = mono_ns();
        while (now < deadline) {
            cpu_relax();
            now = mono_ns();
        }
        int64_t late = now - deadline;

        int64_t stall = atomic_exchange_explicit(&k->stall_ns, 0, memory_order_relaxed);
        if (stall > 0) {
            int64_t until = mono_ns() + stall;
            while (mono_ns() < until) cpu_relax();
        }

        uint8_t *record = run_tick(k, now, tick, 1);
        fl_record_head *head = (fl_record_head *)record;
        head->wake_late_ns = late;
        int64_t done = mono_ns();
        head->compute_ns = done - now;
        if (record != k->scratch_record) fl_ring_commit(&k->ring);

        if (late > atomic_load_explicit(&k->max_late_ns, memory_order_relaxed)) {
            atomic_store_explicit(&k->max_late_ns, late, memory_order_relaxed);
        }
        atomic_store_explicit(&k->last_tick_ns, now, memory_order_release);
        atomic_store_explicit(&k->ticks, tick + 1, memory_order_release);
        tick += 1;

        deadline += k->period_ns;
        if (done > deadline) {
            int64_t skipped = (done - deadline) / k->period_ns + 1;
            atomic_fetch_add_explicit(&k->missed, (uint64_t)skipped, memory_order_relaxed);
            deadline += skipped * k->period_ns;
        }
    }
    return NULL;
}

/* ---- Python type ---- */

static int get_buffer(PyObject *obj, Py_buffer *view, size_t expected, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0) return -1;
    if ((size_t)view->len != expected) {
        PyErr_Format(PyExc_ValueError, "%s buffer is %zd bytes, expected %zu; build it with the dtype from gateway.control.layout",
                     what, view->len, expected);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static int require_stopped(KernelObject *k, const char *what)
{
    if (k->thread_started) {
        PyErr_Format(PyExc_RuntimeError, "%s needs a stopped loop; call stop() first", what);
        return -1;
    }
    return 0;
}

static void stop_thread(KernelObject *k)
{
    if (!k->thread_started) return;
    atomic_store_explicit(&k->running, 0, memory_order_release);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(k->thread, NULL);
    Py_END_ALLOW_THREADS
    k->thread_started = 0;
    if (k->locked_memory) {
        munlockall();
        k->locked_memory = 0;
    }
}

static void Kernel_dealloc(KernelObject *k)
{
    stop_thread(k);
    free(k->inputs.words);
    free(k->params.words);
    free(k->outputs.words);
    free(k->ring.slots);
    free(k->scratch_record);
    Py_TYPE(k)->tp_free((PyObject *)k);
}

static int Kernel_init(KernelObject *k, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"n_units", "ring_capacity", NULL};
    int n_units;
    unsigned long long capacity = 4096;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i|K", kwlist, &n_units, &capacity)) return -1;
    if (n_units < 1 || n_units > FL_MAX_UNITS) {
        PyErr_Format(PyExc_ValueError, "n_units is %d; it must be between 1 and %d", n_units, FL_MAX_UNITS);
        return -1;
    }
    if (capacity < 2 || (capacity & (capacity - 1)) != 0 || capacity > (1ULL << 24)) {
        PyErr_Format(PyExc_ValueError, "ring_capacity is %llu; it must be a power of two from 2 to 16777216",
                     capacity);
        return -1;
    }
    if (k->inputs.words != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Kernel.__init__ called twice");
        return -1;
    }
    k->n_units = n_units;
    k->record_size = sizeof(fl_record_head) + (size_t)n_units * sizeof(fl_record_unit);
    k->ring.capacity = capacity;
    k->ring.stride = k->record_size;
    k->ring.slots = calloc(capacity, k->record_size);
    k->scratch_record = calloc(1, k->record_size);
    if (!seqlock_alloc(&k->inputs, sizeof(fl_inputs)) || !seqlock_alloc(&k->params, sizeof(fl_params))
        || !seqlock_alloc(&k->outputs, sizeof(fl_outputs)) || k->ring.slots == NULL
        || k->scratch_record == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    atomic_init(&k->ring.head, 0);
    atomic_init(&k->ring.tail, 0);
    atomic_init(&k->ring.overflows, 0);
    fl_state_init(&k->state);
    k->cpu = -1;
    return 0;
}

static PyObject *Kernel_write_inputs(KernelObject *k, PyObject *args)
{
    PyObject *site_obj, *units_obj;
    Py_buffer site, units;
    if (!PyArg_ParseTuple(args, "OO", &site_obj, &units_obj)) return NULL;
    if (get_buffer(site_obj, &site, sizeof(fl_site_in), "site input") < 0) return NULL;
    if (get_buffer(units_obj, &units, (size_t)k->n_units * sizeof(fl_unit_in), "unit input") < 0) {
        PyBuffer_Release(&site);
        return NULL;
    }
    memcpy(&k->in_staging.site, site.buf, sizeof(fl_site_in));
    memcpy(k->in_staging.units, units.buf, (size_t)units.len);
    PyBuffer_Release(&site);
    PyBuffer_Release(&units);
    k->generation += 1;
    k->in_staging.site.generation = k->generation;
    fl_seqlock_write(&k->inputs, &k->in_staging, inputs_bytes(k->n_units));
    return PyLong_FromUnsignedLongLong(k->generation);
}

static PyObject *Kernel_set_params(KernelObject *k, PyObject *args)
{
    PyObject *site_obj, *units_obj;
    Py_buffer site, units;
    fl_params staging;
    if (!PyArg_ParseTuple(args, "OO", &site_obj, &units_obj)) return NULL;
    if (get_buffer(site_obj, &site, sizeof(fl_site_par), "site parameter") < 0) return NULL;
    if (get_buffer(units_obj, &units, (size_t)k->n_units * sizeof(fl_unit_par), "unit parameter") < 0) {
        PyBuffer_Release(&site);
        return NULL;
    }
    memcpy(&staging.site, site.buf, sizeof(fl_site_par));
    memcpy(staging.units, units.buf, (size_t)units.len);
    PyBuffer_Release(&site);
    PyBuffer_Release(&units);
    fl_seqlock_write(&k->params, &staging, params_bytes(k->n_units));
    Py_RETURN_NONE;
}

static PyObject *Kernel_step(KernelObject *k, PyObject *args)
{
    long long now_ns;
    if (!PyArg_ParseTuple(args, "L", &now_ns)) return NULL;
    if (require_stopped(k, "step()") < 0) return NULL;
    if (atomic_load(&k->params.seq) == 0) {
        PyErr_SetString(PyExc_RuntimeError, "step() before set_params(); set the parameters first");
        return NULL;
    }
    uint8_t *record = run_tick(k, now_ns, k->steps, 0);
    ((fl_record_head *)record)->wake_late_ns = 0;
    ((fl_record_head *)record)->compute_ns = 0;
    k->steps += 1;
    return PyBytes_FromStringAndSize((const char *)record, (Py_ssize_t)k->record_size);
}

static PyObject *Kernel_reset_state(KernelObject *k, PyObject *Py_UNUSED(ignored))
{
    if (require_stopped(k, "reset_state()") < 0) return NULL;
    fl_state_init(&k->state);
    k->steps = 0;
    Py_RETURN_NONE;
}

static PyObject *Kernel_start(KernelObject *k, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"period_ns", "spin_ns", "priority", "cpu", "lock_memory", NULL};
    long long period_ns, spin_ns = 100000;
    int priority = 0, cpu = -1, lock_memory = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|Liip", kwlist, &period_ns, &spin_ns, &priority,
                                     &cpu, &lock_memory)) {
        return NULL;
    }
    if (k->thread_started) {
        PyErr_SetString(PyExc_RuntimeError, "the loop is already running");
        return NULL;
    }
    if (period_ns < 100000 || period_ns > 100000000) {
        PyErr_Format(PyExc_ValueError, "period_ns is %lld; it must be between 100000 (10 kHz) and 100000000 (10 Hz)",
                     period_ns);
        return NULL;
    }
    if (spin_ns < 0 || spin_ns >= period_ns) {
        PyErr_Format(PyExc_ValueError, "spin_ns is %lld; it must be 0 or more and below period_ns (%lld)", spin_ns,
                     period_ns);
        return NULL;
    }
    if (cpu < -1 || cpu >= CPU_SETSIZE) {
        PyErr_Format(PyExc_ValueError, "cpu is %d; it must be -1 (no pinning) or 0 to %d", cpu, CPU_SETSIZE - 1);
        return NULL;
    }
    if (priority < 0 || priority > 99) {
        PyErr_Format(PyExc_ValueError, "priority is %d; it must be 0 (no SCHED_FIFO) to 99", priority);
        return NULL;
    }
    if (atomic_load(&k->params.seq) == 0) {
        PyErr_SetString(PyExc_RuntimeError, "start() before set_params(); set the parameters first");
        return NULL;
    }
    k->period_ns = period_ns;
    k->spin_ns = spin_ns;
    k->priority = priority;
    k->cpu = cpu;
    k->granted_fifo = 0;
    k->sched_errno = 0;
    k->granted_cpu = 0;
    k->affinity_errno = 0;
    int mlock_errno = 0;
    if (lock_memory) {
        /* mlockall faults in every mapped page, tens to hundreds of ms in a process
           with numpy loaded; other Python threads (the daemon's pollers) keep running. */
        int locked;
        Py_BEGIN_ALLOW_THREADS
        locked = mlockall(MCL_CURRENT | MCL_FUTURE);
        if (locked != 0) mlock_errno = errno;
        Py_END_ALLOW_THREADS
        if (locked == 0) k->locked_memory = 1;
    }
    atomic_store(&k->ready, 0);
    atomic_store(&k->running, 1);
    atomic_store(&k->ticks, 0);
    atomic_store(&k->missed, 0);
    atomic_store(&k->max_late_ns, 0);
    atomic_store(&k->last_tick_ns, mono_ns());
    /* The loop needs a few kB of stack. glibc's default is 8 MiB, all of it resident once
       mlockall(MCL_FUTURE) is in force, so ask for LOOP_STACK_BYTES instead. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, LOOP_STACK_BYTES);
    int err = pthread_create(&k->thread, &attr, loop_main, k);
    pthread_attr_destroy(&attr);
    if (err != 0) {
        atomic_store(&k->running, 0);
        if (k->locked_memory) munlockall();
        k->locked_memory = 0;
        PyErr_Format(PyExc_OSError, "pthread_create failed: %s", strerror(err));
        return NULL;
    }
    k->thread_started = 1;
    /* The thread sets ready within microseconds; poll with the GIL released. */
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < 20000 && !atomic_load_explicit(&k->ready, memory_order_acquire); i++) {
        struct timespec pause = {.tv_sec = 0, .tv_nsec = 100000};
        nanosleep(&pause, NULL);
    }
    Py_END_ALLOW_THREADS
    if (!atomic_load(&k->ready)) {
        stop_thread(k);
        PyErr_SetString(PyExc_TimeoutError, "the loop thread did not start within 2 s");
        return NULL;
    }
    return Py_BuildValue("{s:O,s:i,s:s,s:O,s:i,s:s,s:O,s:s}", "sched_fifo", k->granted_fifo ? Py_True : Py_False,
                         "priority", k->granted_fifo ? k->priority : 0, "sched_error",
                         k->sched_errno ? strerror(k->sched_errno) : "", "cpu_affinity",
                         k->granted_cpu ? Py_True : Py_False, "cpu", k->granted_cpu ? k->cpu : -1,
                         "affinity_error", k->affinity_errno ? strerror(k->affinity_errno) : "", "mlockall",
                         k->locked_memory ? Py_True : Py_False, "mlock_error",
                         mlock_errno ? strerror(mlock_errno) : "");
}

static PyObject *Kernel_stop(KernelObject *k, PyObject *Py_UNUSED(ignored))
{
    stop_thread(k);
    Py_RETURN_NONE;
}

static PyObject *Kernel_drain_into(KernelObject *k, PyObject *args)
{
    PyObject *obj;
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "O", &obj)) return NULL;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) return NULL;
    uint64_t max_records = (uint64_t)view.len / k->record_size;
    uint64_t count = fl_ring_drain(&k->ring, (uint8_t *)view.buf, max_records);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLongLong(count);
}

static PyObject *Kernel_setpoints(KernelObject *k, PyObject *Py_UNUSED(ignored))
{
    fl_outputs out;
    uint64_t seq = 0;
    /* The thread writes for well under a microsecond; the bound only guards
     * against a thread preempted mid-write. */
    for (int round = 0; round < 1000 && seq == 0; round++) {
        seq = fl_seqlock_read(&k->outputs, &out, sizeof(out), SNAPSHOT_TRIES);
        if (seq == 0) sched_yield();
    }
    if (seq == 0) {
        PyErr_SetString(PyExc_TimeoutError, "could not read a consistent setpoint snapshot");
        return NULL;
    }
    return Py_BuildValue("(y#y#K)", (const char *)out.setpoint_kw, (Py_ssize_t)(k->n_units * sizeof(double)),
                         (const char *)out.enabled, (Py_ssize_t)k->n_units, (unsigned long long)out.tick);
}

static PyObject *Kernel_health(KernelObject *k, PyObject *Py_UNUSED(ignored))
{
    return Py_BuildValue("{s:O,s:K,s:K,s:L,s:L,s:L,s:K,s:K,s:K}", "running", k->thread_started ? Py_True : Py_False,
                         "ticks", (unsigned long long)atomic_load(&k->ticks), "missed",
                         (unsigned long long)atomic_load(&k->missed), "max_late_ns",
                         (long long)atomic_load(&k->max_late_ns), "last_tick_ns",
                         (long long)atomic_load(&k->last_tick_ns), "now_ns", (long long)mono_ns(),
                         "overflows", (unsigned long long)atomic_load(&k->ring.overflows), "snapshot_reuses",
                         (unsigned long long)atomic_load(&k->snapshot_reuses), "pending",
                         (unsigned long long)(atomic_load(&k->ring.head) - atomic_load(&k->ring.tail)));
}

static PyObject *Kernel_stall(KernelObject *k, PyObject *args)
{
    long long ns;
    if (!PyArg_ParseTuple(args, "L", &ns)) return NULL;
    if (ns < 0 || ns > 10000000000LL) {
        PyErr_Format(PyExc_ValueError, "stall of %lld ns is outside 0 to 10 s", ns);
        return NULL;
    }
    atomic_store(&k->stall_ns, ns);
    Py_RETURN_NONE;
}

static PyMethodDef Kernel_methods[] = {
    {"write_inputs", (PyCFunction)Kernel_write_inputs, METH_VARARGS,
     "write_inputs(site, units) -> generation\n\nPublish a new input snapshot under the seqlock."},
    {"set_params", (PyCFunction)Kernel_set_params, METH_VARARGS,
     "set_params(site, units)\n\nPublish new parameters; the next tick uses them."},
    {"step", (PyCFunction)Kernel_step, METH_VARARGS,
     "step(now_ns) -> bytes\n\nRun exactly one tick without the thread and return its record."},
    {"reset_state", (PyCFunction)Kernel_reset_state, METH_NOARGS, "Reset the law state of a stopped loop."},
    {"start", (PyCFunction)(void (*)(void))Kernel_start, METH_VARARGS | METH_KEYWORDS,
     "start(period_ns, spin_ns=100000, priority=0, cpu=-1, lock_memory=False) -> dict of what was granted"},
    {"stop", (PyCFunction)Kernel_stop, METH_NOARGS, "Stop the thread and wait for it."},
    {"drain_into", (PyCFunction)Kernel_drain_into, METH_VARARGS,
     "drain_into(buffer) -> count\n\nMove the oldest records into a writable buffer."},
    {"setpoints", (PyCFunction)Kernel_setpoints, METH_NOARGS,
     "setpoints() -> (setpoint_kw bytes, enabled bytes, tick)"},
    {"health", (PyCFunction)Kernel_health, METH_NOARGS, "Counters of the thread and the ring."},
    {"stall", (PyCFunction)Kernel_stall, METH_VARARGS,
     "stall(ns)\n\nTest hook: make the next tick busy-wait for ns before it runs."},
    {NULL, NULL, 0, NULL},
};

static PyObject *Kernel_get_record_size(KernelObject *k, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(k->record_size);
}

static PyObject *Kernel_get_n_units(KernelObject *k, void *Py_UNUSED(closure)) { return PyLong_FromLong(k->n_units); }

static PyGetSetDef Kernel_getset[] = {
    {"record_size", (getter)Kernel_get_record_size, NULL, "bytes per tick record", NULL},
    {"n_units", (getter)Kernel_get_n_units, NULL, "number of PCS units", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject KernelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "gateway.control._fastloop.Kernel",
    .tp_basicsize = sizeof(KernelObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Shared memory, law state and real-time thread of the fast control loop.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Kernel_init,
    .tp_dealloc = (destructor)Kernel_dealloc,
    .tp_methods = Kernel_methods,
    .tp_getset = Kernel_getset,
};

/* ---- layout export ---- */

#define FIELD(list, type, name, kind)                                                                \
    if (add_field(list, #name, offsetof(type, name), sizeof(((type *)0)->name), kind) < 0) goto fail

static int add_field(PyObject *list, const char *name, size_t offset, size_t size, const char *kind)
{
    PyObject *item = Py_BuildValue("(snns)", name, (Py_ssize_t)offset, (Py_ssize_t)size, kind);
    if (item == NULL) return -1;
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *struct_entry(PyObject *fields, size_t size)
{
    PyObject *entry = Py_BuildValue("{s:O,s:n}", "fields", fields, "size", (Py_ssize_t)size);
    Py_DECREF(fields);
    return entry;
}

static PyObject *fl_layout(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    PyObject *site_in = PyList_New(0), *unit_in = PyList_New(0), *site_par = PyList_New(0);
    PyObject *unit_par = PyList_New(0), *head = PyList_New(0), *unit_rec = PyList_New(0);
    PyObject *result = NULL;
    if (!site_in || !unit_in || !site_par || !unit_par || !head || !unit_rec) goto fail;

    FIELD(site_in, fl_site_in, generation, "u8");
    FIELD(site_in, fl_site_in, grid_kw, "f8");
    FIELD(site_in, fl_site_in, load_kw, "f8");
    FIELD(site_in, fl_site_in, grid_t_ns, "i8");
    FIELD(site_in, fl_site_in, load_t_ns, "i8");
    FIELD(site_in, fl_site_in, grid_quality, "i4");
    FIELD(site_in, fl_site_in, load_quality, "i4");
    FIELD(site_in, fl_site_in, estop, "i4");
    FIELD(site_in, fl_site_in, reset_count, "u4");

    FIELD(unit_in, fl_unit_in, pcs_p_kw, "f8");
    FIELD(unit_in, fl_unit_in, soc_pct, "f8");
    FIELD(unit_in, fl_unit_in, bms_voltage_v, "f8");
    FIELD(unit_in, fl_unit_in, bms_charge_limit_a, "f8");
    FIELD(unit_in, fl_unit_in, bms_discharge_limit_a, "f8");
    FIELD(unit_in, fl_unit_in, pcs_t_ns, "i8");
    FIELD(unit_in, fl_unit_in, bms_t_ns, "i8");
    FIELD(unit_in, fl_unit_in, pcs_quality, "i4");
    FIELD(unit_in, fl_unit_in, pcs_fault, "i4");
    FIELD(unit_in, fl_unit_in, bms_quality, "i4");
    FIELD(unit_in, fl_unit_in, bms_protection, "i4");

    FIELD(site_par, fl_site_par, dt_s, "f8");
    FIELD(site_par, fl_site_par, cap_kw, "f8");
    FIELD(site_par, fl_site_par, floor_kw, "f8");
    FIELD(site_par, fl_site_par, ramp_kw_per_s, "f8");
    FIELD(site_par, fl_site_par, lp_alpha, "f8");
    FIELD(site_par, fl_site_par, soc_hard_min_pct, "f8");
    FIELD(site_par, fl_site_par, soc_soft_min_pct, "f8");
    FIELD(site_par, fl_site_par, soc_soft_max_pct, "f8");
    FIELD(site_par, fl_site_par, soc_hard_max_pct, "f8");
    FIELD(site_par, fl_site_par, deadband_kw, "f8");
    FIELD(site_par, fl_site_par, safe_ramp_kw_per_s, "f8");
    FIELD(site_par, fl_site_par, recharge_kw, "f8");
    FIELD(site_par, fl_site_par, recharge_hysteresis_pct, "f8");
    FIELD(site_par, fl_site_par, breach_margin_kw, "f8");
    FIELD(site_par, fl_site_par, period_ns, "i8");
    FIELD(site_par, fl_site_par, meter_stale_ns, "i8");
    FIELD(site_par, fl_site_par, bms_stale_ns, "i8");
    FIELD(site_par, fl_site_par, pcs_stale_ns, "i8");
    FIELD(site_par, fl_site_par, breach_ticks, "i4");
    FIELD(site_par, fl_site_par, reaction, "i4");
    FIELD(site_par, fl_site_par, pad, "i4");

    FIELD(unit_par, fl_unit_par, rated_kw, "f8");
    FIELD(unit_par, fl_unit_par, slew_kw_per_s, "f8");

    FIELD(head, fl_record_head, tick, "u8");
    FIELD(head, fl_record_head, t_ns, "i8");
    FIELD(head, fl_record_head, wake_late_ns, "i8");
    FIELD(head, fl_record_head, compute_ns, "i8");
    FIELD(head, fl_record_head, generation, "u8");
    FIELD(head, fl_record_head, grid_kw, "f8");
    FIELD(head, fl_record_head, load_kw, "f8");
    FIELD(head, fl_record_head, target_kw, "f8");
    FIELD(head, fl_record_head, demand_kw, "f8");
    FIELD(head, fl_record_head, uncovered_kw, "f8");
    FIELD(head, fl_record_head, fault_bits, "u4");
    FIELD(head, fl_record_head, active_fault_bits, "u4");
    FIELD(head, fl_record_head, limit_bits, "u4");
    FIELD(head, fl_record_head, pad, "u4");

    FIELD(unit_rec, fl_record_unit, setpoint_kw, "f8");
    FIELD(unit_rec, fl_record_unit, pcs_p_kw, "f8");
    FIELD(unit_rec, fl_record_unit, soc_pct, "f8");
    FIELD(unit_rec, fl_record_unit, discharge_cap_kw, "f8");
    FIELD(unit_rec, fl_record_unit, charge_cap_kw, "f8");
    FIELD(unit_rec, fl_record_unit, fault_bits, "u4");
    FIELD(unit_rec, fl_record_unit, limit_bits, "u2");
    FIELD(unit_rec, fl_record_unit, reaction, "u1");
    FIELD(unit_rec, fl_record_unit, enabled, "u1");

    result = Py_BuildValue("{s:N,s:N,s:N,s:N,s:N,s:N,s:i}", "site_in", struct_entry(site_in, sizeof(fl_site_in)),
                           "unit_in", struct_entry(unit_in, sizeof(fl_unit_in)), "site_par",
                           struct_entry(site_par, sizeof(fl_site_par)), "unit_par",
                           struct_entry(unit_par, sizeof(fl_unit_par)), "record_head",
                           struct_entry(head, sizeof(fl_record_head)), "record_unit",
                           struct_entry(unit_rec, sizeof(fl_record_unit)), "max_units", FL_MAX_UNITS);
    return result;

fail:
    Py_XDECREF(site_in);
    Py_XDECREF(unit_in);
    Py_XDECREF(site_par);
    Py_XDECREF(unit_par);
    Py_XDECREF(head);
    Py_XDECREF(unit_rec);
    return NULL;
}

static PyObject *fl_monotonic_ns(PyObject *Py_UNUSED(module), PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(mono_ns());
}

static PyMethodDef module_methods[] = {
    {"layout", fl_layout, METH_NOARGS, "Field offsets, sizes and kinds of every shared struct."},
    {"monotonic_ns", fl_monotonic_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns, the clock of the loop."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastloop_module = {
    PyModuleDef_HEAD_INIT, "gateway.control._fastloop",
    "The 1 kHz control loop on a native thread; use gateway.control.loop instead.", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastloop(void)
{
    if (PyType_Ready(&KernelType) < 0) return NULL;
    PyObject *module = PyModule_Create(&fastloop_module);
    if (module == NULL) return NULL;
    Py_INCREF(&KernelType);
    if (PyModule_AddObject(module, "Kernel", (PyObject *)&KernelType) < 0) {
        Py_DECREF(&KernelType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyModule_AddIntConstant(module, "MAX_UNITS", FL_MAX_UNITS) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
