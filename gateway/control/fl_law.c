/*
 * The tick function of the fast loop. gateway/control/law.py is the numpy
 * reference of this file: the two perform the same floating-point operations
 * in the same order, so the equivalence tests can require equal results.
 * Change both together.
 */
#include "fl_law.h"

#include <math.h>
#include <string.h>

static double clamp(double x, double lo, double hi) { return fmin(fmax(x, lo), hi); }

/* A reading is usable when its quality is good and it is neither too old nor from the future. */
static int fresh(int32_t quality, int64_t t_ns, int64_t now_ns, int64_t stale_ns, int64_t future_ns)
{
    int64_t age_ns = now_ns - t_ns;
    return quality == FL_QUALITY_GOOD && age_ns <= stale_ns && age_ns >= -future_ns;
}

static int32_t strongest_reaction(const fl_site_par *p, uint32_t bits)
{
    int32_t reaction = FL_REACT_NONE;
    for (int b = 0; b < FL_FAULT_BITS; b++) {
        if ((bits & (1u << b)) && p->reaction[b] > reaction) {
            reaction = p->reaction[b];
        }
    }
    return reaction;
}

void fl_state_init(fl_state *st) { memset(st, 0, sizeof(*st)); }

void fl_tick(const fl_params *par, int n, fl_state *st, const fl_inputs *in, int64_t now_ns,
             double *out_kw, uint8_t *enabled, fl_record_head *head, fl_record_unit *units)
{
    const fl_site_par *p = &par->site;
    const fl_site_in *s = &in->site;
    const double dt = p->dt_s;
    uint32_t site_limits = 0;
    uint32_t unit_limit_any = 0;
    uint32_t unit_fault_any = 0;
    uint32_t unit_active_any = 0;
    double dis_hw[FL_MAX_UNITS];
    double chg_hw[FL_MAX_UNITS];
    int bms_ok[FL_MAX_UNITS];
    uint32_t unit_active[FL_MAX_UNITS];
    int32_t reaction[FL_MAX_UNITS];

    /* 1. Input validity and the interlock conditions of this tick. */
    int grid_ok = fresh(s->grid_quality, s->grid_t_ns, now_ns, p->meter_stale_ns, p->period_ns)
                  && isfinite(s->grid_kw);
    int load_ok = fresh(s->load_quality, s->load_t_ns, now_ns, p->meter_stale_ns, p->period_ns)
                  && isfinite(s->load_kw);
    uint32_t site_active = 0;
    if (!grid_ok) site_active |= FL_FAULT_GRID_STALE;
    if (!load_ok) site_active |= FL_FAULT_LOAD_STALE;
    if (s->estop) site_active |= FL_FAULT_ESTOP;

    for (int i = 0; i < n; i++) {
        const fl_unit_in *u = &in->units[i];
        double rated = par->units[i].rated_kw;
        uint32_t active = 0;
        int pcs_ok = fresh(u->pcs_quality, u->pcs_t_ns, now_ns, p->pcs_stale_ns, p->period_ns)
                     && isfinite(u->pcs_p_kw);
        bms_ok[i] = fresh(u->bms_quality, u->bms_t_ns, now_ns, p->bms_stale_ns, p->period_ns)
                    && isfinite(u->soc_pct) && isfinite(u->bms_voltage_v)
                    && isfinite(u->bms_charge_limit_a) && isfinite(u->bms_discharge_limit_a);
        if (bms_ok[i]) {
            /* Current limits in A at the string voltage, turned into kW. */
            dis_hw[i] = fmin(rated, fmax(0.0, u->bms_voltage_v * u->bms_discharge_limit_a * 1e-3));
            chg_hw[i] = fmin(rated, fmax(0.0, u->bms_voltage_v * u->bms_charge_limit_a * 1e-3));
            if (u->bms_protection) active |= FL_FAULT_BMS_PROTECTION;
            if (u->soc_pct < p->soc_hard_min_pct || u->soc_pct > p->soc_hard_max_pct) {
                active |= FL_FAULT_SOC_HARD;
            }
        } else {
            /* Limits unknown: only the rating bounds a hold or a ramp; the
             * BMS_SILENT reaction decides what the unit does. */
            dis_hw[i] = rated;
            chg_hw[i] = rated;
            active |= FL_FAULT_BMS_SILENT;
        }
        if (pcs_ok) {
            double limit = u->pcs_p_kw >= 0.0 ? dis_hw[i] : chg_hw[i];
            if (fabs(u->pcs_p_kw) > limit + p->breach_margin_kw) {
                st->breach_count[i] += 1;
            } else {
                st->breach_count[i] = 0;
            }
            if (st->breach_count[i] >= p->breach_ticks) active |= FL_FAULT_LIMIT_BREACH;
            if (u->pcs_fault) active |= FL_FAULT_PCS_FAULT;
        } else {
            st->breach_count[i] = 0;
            active |= FL_FAULT_PCS_LOST;
        }
        unit_active[i] = active;
        unit_active_any |= active;
    }

    /* 2. Latch. A changed reset_count clears every latched bit whose cause is gone. */
    if (s->reset_count != st->last_reset_count) {
        st->last_reset_count = s->reset_count;
        st->site_latched = site_active;
        for (int i = 0; i < n; i++) st->unit_latched[i] = unit_active[i];
    } else {
        st->site_latched |= site_active;
        for (int i = 0; i < n; i++) st->unit_latched[i] |= unit_active[i];
    }
    int32_t site_reaction = strongest_reaction(p, st->site_latched);
    for (int i = 0; i < n; i++) {
        int32_t r = strongest_reaction(p, st->unit_latched[i]);
        reaction[i] = r > site_reaction ? r : site_reaction;
        unit_fault_any |= st->unit_latched[i];
    }

    /* 3. Recharge below the cap when the mean SoC of the units with a good BMS is low. */
    double soc_sum = 0.0;
    int soc_count = 0;
    for (int i = 0; i < n; i++) {
        if (bms_ok[i]) {
            soc_sum += in->units[i].soc_pct;
            soc_count += 1;
        }
    }
    if (soc_count == 0 || !(p->recharge_kw > 0.0)) {
        st->recharging = 0;
    } else {
        double soc_mean = soc_sum / (double)soc_count;
        if (!st->recharging && soc_mean < p->soc_soft_min_pct) {
            st->recharging = 1;
        } else if (st->recharging && soc_mean >= p->soc_soft_min_pct + p->recharge_hysteresis_pct) {
            st->recharging = 0;
        }
    }
    if (st->recharging) site_limits |= FL_LIMIT_RECHARGE;

    /* 4. Grid target: low-pass of the load (plus recharge), clamped to
     * [floor, cap], then moved by at most ramp_kw_per_s * dt. */
    if (load_ok) {
        if (!st->initialised) {
            st->initialised = 1;
            st->load_filt_kw = s->load_kw;
            st->target_kw = clamp(s->load_kw, p->floor_kw, p->cap_kw);
        } else {
            st->load_filt_kw += p->lp_alpha * (s->load_kw - st->load_filt_kw);
            double desired = st->load_filt_kw + (st->recharging ? p->recharge_kw : 0.0);
            if (desired > p->cap_kw) site_limits |= FL_LIMIT_CAP;
            if (desired < p->floor_kw) site_limits |= FL_LIMIT_FLOOR;
            double step = clamp(desired, p->floor_kw, p->cap_kw) - st->target_kw;
            double max_step = p->ramp_kw_per_s * dt;
            if (step > max_step) {
                step = max_step;
                site_limits |= FL_LIMIT_RAMP;
            } else if (step < -max_step) {
                step = -max_step;
                site_limits |= FL_LIMIT_RAMP;
            }
            st->target_kw += step;
        }
    }
    double demand = load_ok ? s->load_kw - st->target_kw : 0.0;
    if (grid_ok && s->grid_kw > p->cap_kw) site_limits |= FL_LIMIT_GRID_OVER_CAP;

    /* 5. Capability of each unit that runs normally: BMS limits and rating,
     * derated linearly across the SoC soft band toward the hard limits. */
    double dis_cap[FL_MAX_UNITS];
    double chg_cap[FL_MAX_UNITS];
    uint32_t unit_limits[FL_MAX_UNITS];
    double dis_total = 0.0;
    double chg_total = 0.0;
    for (int i = 0; i < n; i++) {
        const fl_unit_in *u = &in->units[i];
        double rated = par->units[i].rated_kw;
        unit_limits[i] = 0;
        if (reaction[i] == FL_REACT_NONE) {
            double f_dis = clamp((u->soc_pct - p->soc_hard_min_pct)
                                 / (p->soc_soft_min_pct - p->soc_hard_min_pct), 0.0, 1.0);
            double f_chg = clamp((p->soc_hard_max_pct - u->soc_pct)
                                 / (p->soc_hard_max_pct - p->soc_soft_max_pct), 0.0, 1.0);
            dis_cap[i] = dis_hw[i] * f_dis;
            chg_cap[i] = chg_hw[i] * f_chg;
            if (dis_hw[i] < rated || chg_hw[i] < rated) unit_limits[i] |= FL_LIMIT_BMS_LIMIT;
            if (f_dis < 1.0 || f_chg < 1.0) unit_limits[i] |= FL_LIMIT_SOC_DERATE;
        } else {
            dis_cap[i] = 0.0;
            chg_cap[i] = 0.0;
        }
        dis_total += dis_cap[i];
        chg_total += chg_cap[i];
    }

    /* 6. Allocation in proportion to capability; what is left is uncovered. */
    double share = 0.0;
    double uncovered = 0.0;
    if (demand >= 0.0) {
        double need = dis_total > 0.0 ? demand / dis_total : INFINITY;
        if (need > 1.0) {
            share = 1.0;
            uncovered = demand - dis_total;
        } else {
            share = need;
        }
    } else {
        double need = chg_total > 0.0 ? -demand / chg_total : INFINITY;
        if (need > 1.0) {
            share = 1.0;
            uncovered = demand + chg_total;
        } else {
            share = need;
        }
    }
    if (uncovered != 0.0) site_limits |= FL_LIMIT_UNCOVERED;

    /* 7. Per unit: slew, clamp, safe action, deadband. */
    for (int i = 0; i < n; i++) {
        double prev = st->sp_kw[i];
        double sp;
        double lim_dis = dis_hw[i];
        double lim_chg = chg_hw[i];
        if (reaction[i] == FL_REACT_NONE) {
            double alloc = demand >= 0.0 ? dis_cap[i] * share : -(chg_cap[i] * share);
            double max_step = par->units[i].slew_kw_per_s * dt;
            double step = alloc - prev;
            if (step > max_step) {
                step = max_step;
                unit_limits[i] |= FL_LIMIT_SLEW;
            } else if (step < -max_step) {
                step = -max_step;
                unit_limits[i] |= FL_LIMIT_SLEW;
            }
            sp = prev + step;
            lim_dis = dis_cap[i];
            lim_chg = chg_cap[i];
            if (sp > lim_dis || sp < -lim_chg) unit_limits[i] |= FL_LIMIT_UNIT_CAP;
            sp = clamp(sp, -lim_chg, lim_dis);
        } else if (reaction[i] == FL_REACT_HOLD) {
            sp = clamp(prev, -lim_chg, lim_dis);
        } else if (reaction[i] == FL_REACT_RAMP_TO_ZERO) {
            double max_step = p->safe_ramp_kw_per_s * dt;
            sp = clamp(prev - clamp(prev, -max_step, max_step), -lim_chg, lim_dis);
        } else {
            sp = 0.0;
        }
        st->sp_kw[i] = sp;

        /* The output follows when the change reaches the deadband, when it
         * reaches exactly 0, or when the old output lies outside the limits. */
        double out = st->out_kw[i];
        if (sp == 0.0 || fabs(sp - out) >= p->deadband_kw || out > lim_dis || out < -lim_chg) {
            st->out_kw[i] = sp;
        } else if (sp != out) {
            unit_limits[i] |= FL_LIMIT_DEADBAND;
        }
        out_kw[i] = st->out_kw[i];
        enabled[i] = reaction[i] != FL_REACT_DISABLE;
        unit_limit_any |= unit_limits[i];

        units[i].setpoint_kw = st->out_kw[i];
        units[i].pcs_p_kw = in->units[i].pcs_p_kw;
        units[i].soc_pct = in->units[i].soc_pct;
        units[i].discharge_cap_kw = dis_cap[i];
        units[i].charge_cap_kw = chg_cap[i];
        units[i].fault_bits = st->unit_latched[i];
        units[i].limit_bits = (uint16_t)unit_limits[i];
        units[i].reaction = (uint8_t)reaction[i];
        units[i].enabled = enabled[i];
    }

    head->generation = s->generation;
    head->grid_kw = s->grid_kw;
    head->load_kw = s->load_kw;
    head->target_kw = st->target_kw;
    head->demand_kw = demand;
    head->uncovered_kw = uncovered;
    head->fault_bits = st->site_latched | unit_fault_any;
    head->active_fault_bits = site_active | unit_active_any;
    head->limit_bits = site_limits | unit_limit_any;
    head->pad = 0;
}
