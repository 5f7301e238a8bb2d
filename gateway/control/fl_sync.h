/*
 * Lock-free exchange between the real-time thread and Python.
 *
 * fl_seqlock: one writer, one reader, never blocks the writer. The payload
 * is an array of 64-bit words read and written with relaxed atomics, so a
 * concurrent copy is well defined C11. The writer makes the sequence odd,
 * copies, then makes it even with a release store. The reader retries while
 * the sequence is odd or changed during its copy.
 *
 *   seq: even ... odd (writing) ... even+2 (published)
 *
 * fl_ring: single-producer single-consumer ring of fixed-size records.
 * head counts records written, tail records read; both only grow and the
 * slot is index & (capacity - 1). The producer drops the record and counts
 * an overflow when the ring is full, so it never waits for the consumer.
 */
#ifndef BESSGW_FL_SYNC_H
#define BESSGW_FL_SYNC_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    _Atomic uint64_t seq;
    size_t n_words;
    _Atomic uint64_t *words;
} fl_seqlock;

static inline void fl_seqlock_write(fl_seqlock *lock, const void *src, size_t n_bytes)
{
    const uint64_t *from = (const uint64_t *)src;
    size_t n = n_bytes / 8;
    uint64_t seq = atomic_load_explicit(&lock->seq, memory_order_relaxed);
    atomic_store_explicit(&lock->seq, seq + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (size_t i = 0; i < n; i++) {
        atomic_store_explicit(&lock->words[i], from[i], memory_order_relaxed);
    }
    atomic_store_explicit(&lock->seq, seq + 2, memory_order_release);
}

/* Copy a consistent snapshot into dst. Returns the sequence read, or 0 when
 * max_tries attempts all overlapped a write (dst then contains garbage). */
static inline uint64_t fl_seqlock_read(fl_seqlock *lock, void *dst, size_t n_bytes, int max_tries)
{
    uint64_t *to = (uint64_t *)dst;
    size_t n = n_bytes / 8;
    for (int attempt = 0; attempt < max_tries; attempt++) {
        uint64_t before = atomic_load_explicit(&lock->seq, memory_order_acquire);
        if (before & 1u) continue;
        for (size_t i = 0; i < n; i++) {
            to[i] = atomic_load_explicit(&lock->words[i], memory_order_relaxed);
        }
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&lock->seq, memory_order_relaxed) == before) return before + 2;
    }
    return 0;
}

typedef struct {
    _Atomic uint64_t head;
    _Atomic uint64_t tail;
    _Atomic uint64_t overflows;
    uint64_t capacity; /* power of two */
    size_t stride;     /* bytes per record */
    uint8_t *slots;
} fl_ring;

/* Return the slot for the next record, or NULL when the ring is full (the
 * overflow is counted). The record becomes visible with fl_ring_commit. */
static inline uint8_t *fl_ring_reserve(fl_ring *ring)
{
    uint64_t head = atomic_load_explicit(&ring->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_acquire);
    if (head - tail >= ring->capacity) {
        atomic_fetch_add_explicit(&ring->overflows, 1, memory_order_relaxed);
        return NULL;
    }
    return ring->slots + (size_t)(head & (ring->capacity - 1)) * ring->stride;
}

static inline void fl_ring_commit(fl_ring *ring)
{
    uint64_t head = atomic_load_explicit(&ring->head, memory_order_relaxed);
    atomic_store_explicit(&ring->head, head + 1, memory_order_release);
}

/* Copy up to max_records of the oldest records into dst; return how many. */
static inline uint64_t fl_ring_drain(fl_ring *ring, uint8_t *dst, uint64_t max_records)
{
    uint64_t head = atomic_load_explicit(&ring->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&ring->tail, memory_order_relaxed);
    uint64_t count = head - tail;
    if (count > max_records) count = max_records;
    for (uint64_t k = 0; k < count; k++) {
        const uint8_t *slot = ring->slots + (size_t)((tail + k) & (ring->capacity - 1)) * ring->stride;
        memcpy(dst + (size_t)k * ring->stride, slot, ring->stride);
    }
    atomic_store_explicit(&ring->tail, tail + count, memory_order_release);
    return count;
}

#endif
