/*
 * The control law of the fast loop: data layouts and the tick function.
 *
 * Everything here is plain C with no Python and no clock, so the same tick
 * runs on the real-time thread and in the deterministic step mode that the
 * equivalence tests compare with gateway/control/law.py.
 *
 * Units are in the names (kW, pct, ns, s). Signs: grid power positive =
 * import, load positive = consumption, battery and PCS power positive =
 * discharge into the site.
 *
 * The structs are shared with numpy through structured dtypes defined in
 * gateway/control/layout.py. fl_layout() in _fastloop.c exports every field
 * offset, and the Python side checks them against its dtypes at start-up.
 * Every struct is a multiple of 8 bytes so that the seqlock can copy it as
 * 64-bit words.
 */
#ifndef BESSGW_FL_LAW_H
#define BESSGW_FL_LAW_H

#include <stdint.h>

#define FL_MAX_UNITS 64

/* Quality codes, the same integers as drivers.quality.Quality. */
#define FL_QUALITY_GOOD 0

/* Safe actions, ordered by severity so that the strongest one wins. */
#define FL_REACT_NONE 0
#define FL_REACT_HOLD 1
#define FL_REACT_RAMP_TO_ZERO 2
#define FL_REACT_DISABLE 3

/*
 * Fault bits. Bits 0-7 are site-wide and act on every unit; bits 8-15 belong
 * to one unit.
 *
 *   bit  0 GRID_STALE      grid reading not good, not finite, or older than meter_stale_ns
 *   bit  1 LOAD_STALE      load reading likewise
 *   bit  2 ESTOP           emergency stop input set
 *   bit  8 BMS_SILENT      BMS reading not good, not finite, or older than bms_stale_ns
 *   bit  9 BMS_PROTECTION  BMS reports a protection (trip) state
 *   bit 10 SOC_HARD        SoC outside [soc_hard_min_pct, soc_hard_max_pct]
 *   bit 11 LIMIT_BREACH    measured PCS power beyond its limit plus margin for breach_ticks ticks
 *   bit 12 PCS_LOST        PCS reading not good, not finite, or older than pcs_stale_ns
 *   bit 13 PCS_FAULT       PCS reports a fault
 */
#define FL_FAULT_GRID_STALE (1u << 0)
#define FL_FAULT_LOAD_STALE (1u << 1)
#define FL_FAULT_ESTOP (1u << 2)
#define FL_FAULT_BMS_SILENT (1u << 8)
#define FL_FAULT_BMS_PROTECTION (1u << 9)
#define FL_FAULT_SOC_HARD (1u << 10)
#define FL_FAULT_LIMIT_BREACH (1u << 11)
#define FL_FAULT_PCS_LOST (1u << 12)
#define FL_FAULT_PCS_FAULT (1u << 13)
#define FL_FAULT_BITS 16

/*
 * Limit bits: which limit shaped this tick's result. Informational only.
 *
 *   bit  0 CAP              the grid target sits at the import cap
 *   bit  1 FLOOR            the grid target sits at the floor
 *   bit  2 RAMP             the grid target moved by the full ramp step
 *   bit  3 UNCOVERED        the battery cannot cover the whole demand
 *   bit  4 RECHARGE         recharge below the cap is active
 *   bit  5 GRID_OVER_CAP    the measured grid import is above the cap
 *   bit  6 SNAPSHOT_REUSED  the writer held the input seqlock too long, so the
 *                           previous snapshot was used (real-time thread only)
 *   bit  8 BMS_LIMIT        a BMS current limit is below the PCS rating
 *   bit  9 SOC_DERATE       the SoC soft band derates the unit
 *   bit 10 SLEW             the unit slew limit held the setpoint back
 *   bit 11 UNIT_CAP         the setpoint was clamped to the unit's capability
 *   bit 12 DEADBAND         the output kept its previous value (change below deadband)
 */
#define FL_LIMIT_CAP (1u << 0)
#define FL_LIMIT_FLOOR (1u << 1)
#define FL_LIMIT_RAMP (1u << 2)
#define FL_LIMIT_UNCOVERED (1u << 3)
#define FL_LIMIT_RECHARGE (1u << 4)
#define FL_LIMIT_GRID_OVER_CAP (1u << 5)
#define FL_LIMIT_SNAPSHOT_REUSED (1u << 6)
#define FL_LIMIT_BMS_LIMIT (1u << 8)
#define FL_LIMIT_SOC_DERATE (1u << 9)
#define FL_LIMIT_SLEW (1u << 10)
#define FL_LIMIT_UNIT_CAP (1u << 11)
#define FL_LIMIT_DEADBAND (1u << 12)

/* Inputs: one site block followed by one block per unit. */
typedef struct {
    uint64_t generation;  /* set by the writer on every publish */
    double grid_kw;
    double load_kw;       /* net site load: racks + facility - on-site generation */
    int64_t grid_t_ns;    /* CLOCK_MONOTONIC time the value was received */
    int64_t load_t_ns;
    int32_t grid_quality;
    int32_t load_quality;
    int32_t estop;        /* non-zero: emergency stop pressed */
    uint32_t reset_count; /* a change requests a fault reset */
} fl_site_in;

typedef struct {
    double pcs_p_kw;              /* measured PCS active power */
    double soc_pct;
    double bms_voltage_v;
    double bms_charge_limit_a;    /* magnitude */
    double bms_discharge_limit_a; /* magnitude */
    int64_t pcs_t_ns;
    int64_t bms_t_ns;
    int32_t pcs_quality;
    int32_t pcs_fault;            /* non-zero: the PCS reports a fault */
    int32_t bms_quality;          /* worst quality of the BMS values above */
    int32_t bms_protection;       /* non-zero: the BMS is in protection */
} fl_unit_in;

typedef struct {
    fl_site_in site;
    fl_unit_in units[FL_MAX_UNITS];
} fl_inputs;

/*
 * Parameters. Derived values (dt_s, lp_alpha, *_ns, breach_ticks) are
 * computed once in Python (law.LawParams), so C and numpy use the same
 * numbers to the last bit.
 */
typedef struct {
    double dt_s;                 /* nominal tick period */
    double cap_kw;
    double floor_kw;
    double ramp_kw_per_s;
    double lp_alpha;             /* 1 - exp(-dt_s / smoothing_tau_s), 1 when tau is 0 */
    double soc_hard_min_pct;
    double soc_soft_min_pct;
    double soc_soft_max_pct;
    double soc_hard_max_pct;
    double deadband_kw;
    double safe_ramp_kw_per_s;
    double recharge_kw;
    double recharge_hysteresis_pct;
    double breach_margin_kw;
    int64_t period_ns;           /* also the tolerance for timestamps in the future */
    int64_t meter_stale_ns;
    int64_t bms_stale_ns;
    int64_t pcs_stale_ns;
    int32_t breach_ticks;
    int32_t reaction[FL_FAULT_BITS]; /* FL_REACT_* per fault bit */
    int32_t pad;
} fl_site_par;

typedef struct {
    double rated_kw;
    double slew_kw_per_s;
} fl_unit_par;

typedef struct {
    fl_site_par site;
    fl_unit_par units[FL_MAX_UNITS];
} fl_params;

/* State carried from tick to tick. */
typedef struct {
    int32_t initialised;
    int32_t recharging;
    double load_filt_kw;
    double target_kw;
    uint32_t site_latched;
    uint32_t last_reset_count;
    double sp_kw[FL_MAX_UNITS];   /* after slew and limits */
    double out_kw[FL_MAX_UNITS];  /* after deadband: the published setpoint */
    uint32_t unit_latched[FL_MAX_UNITS];
    int32_t breach_count[FL_MAX_UNITS];
} fl_state;

/* Tick record: one header, then one block per unit. */
typedef struct {
    uint64_t tick;
    int64_t t_ns;            /* wake time, the "now" of this tick */
    int64_t wake_late_ns;    /* wake time minus deadline */
    int64_t compute_ns;      /* snapshot + law + publish */
    uint64_t generation;     /* generation of the inputs used */
    double grid_kw;          /* inputs used, as received */
    double load_kw;
    double target_kw;
    double demand_kw;        /* load - target: what the battery is asked for */
    double uncovered_kw;     /* demand the battery cannot cover (signed) */
    uint32_t fault_bits;     /* latched, site and all units */
    uint32_t active_fault_bits;
    uint32_t limit_bits;     /* site and all units */
    uint32_t pad;
} fl_record_head;

typedef struct {
    double setpoint_kw;      /* published setpoint */
    double pcs_p_kw;         /* input used */
    double soc_pct;          /* input used */
    double discharge_cap_kw; /* capability after BMS limits, rating and SoC derating */
    double charge_cap_kw;
    uint32_t fault_bits;     /* latched unit faults */
    uint16_t limit_bits;
    uint8_t reaction;        /* FL_REACT_* applied */
    uint8_t enabled;         /* 0 when the reaction is disable */
} fl_record_unit;

/* Reset the state to what a new loop starts with. */
void fl_state_init(fl_state *st);

/*
 * Run one tick: interlocks, law and allocation. Updates st, writes the
 * published setpoints into out_kw[n] and enabled[n], and fills the law part
 * of the record (every field but tick, t_ns, wake_late_ns and compute_ns).
 */
void fl_tick(const fl_params *par, int n, fl_state *st, const fl_inputs *in, int64_t now_ns,
             double *out_kw, uint8_t *enabled, fl_record_head *head, fl_record_unit *units);

#endif
