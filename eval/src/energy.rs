//! Energy: joules from RAPL counters (`/sys/class/powercap/intel-rapl:*`) where the machine
//! exposes them, else an estimate from this process's CPU time times a per-core power figure,
//! labelled as such; and grams CO2e from a grid intensity the user can override.

use serde::Serialize;

/// Default power of one fully busy core, in watts, for the estimate. A current server CPU
/// draws roughly 5-12 W per core under full load (package TDP / cores, e.g. 270 W / 32 cores
/// ≈ 8.4 W); 10 W is a round figure toward the upper end, so estimates err high.
pub const DEFAULT_WATTS_PER_CORE: f64 = 10.0;

/// Default grid carbon intensity in g CO2e per kWh: the world average electricity mix,
/// about 475 g/kWh (IEA). Override with the local grid's figure.
pub const DEFAULT_GRID_G_PER_KWH: f64 = 475.0;

/// A snapshot to measure energy between two points.
#[derive(Debug, Clone)]
pub struct EnergyMeter {
    rapl_uj: Option<Vec<(String, u64, u64)>>,
    cpu_seconds: f64,
    wall: std::time::Instant,
}

/// Energy spent between [`EnergyMeter::start`] and [`EnergyMeter::finish`].
#[derive(Debug, Clone, Serialize)]
pub struct EnergyReport {
    /// `rapl` (measured) or `estimate` (CPU time x watts per core).
    pub source: &'static str,
    /// Joules.
    pub joules: f64,
    /// Joules per 1,000 tokens processed.
    pub joules_per_1k_tokens: f64,
    /// Tokens the figure is divided by.
    pub tokens: u64,
    /// CPU seconds of this process (user + system).
    pub cpu_seconds: f64,
    /// Wall seconds.
    pub wall_seconds: f64,
    /// Watts per busy core assumed (estimate only).
    pub watts_per_core: Option<f64>,
    /// Grid intensity used, g CO2e per kWh.
    pub grid_g_co2e_per_kwh: f64,
    /// Grams CO2e.
    pub g_co2e: f64,
    /// Grams CO2e per 1,000 tokens.
    pub g_co2e_per_1k_tokens: f64,
}

fn rapl_read() -> Option<Vec<(String, u64, u64)>> {
    let dir = std::fs::read_dir("/sys/class/powercap").ok()?;
    let mut out = Vec::new();
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        // Package domains only (intel-rapl:0, intel-rapl:1); sub-domains are inside them.
        if name.starts_with("intel-rapl:") && name.matches(':').count() == 1 {
            let p = e.path();
            let uj = std::fs::read_to_string(p.join("energy_uj"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            let max = std::fs::read_to_string(p.join("max_energy_range_uj"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(u64::MAX);
            out.push((name, uj, max));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// This process's user + system CPU seconds, from `/proc/self/stat` (clock ticks of 1/100 s,
/// Linux's USER_HZ on every mainstream architecture).
pub fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

impl EnergyMeter {
    /// Starts measuring.
    pub fn start() -> Self {
        Self {
            rapl_uj: rapl_read(),
            cpu_seconds: cpu_seconds(),
            wall: std::time::Instant::now(),
        }
    }

    /// Energy since `start`, divided over `tokens`.
    pub fn finish(&self, tokens: u64, watts_per_core: f64, grid_g_per_kwh: f64) -> EnergyReport {
        let cpu = cpu_seconds() - self.cpu_seconds;
        let wall = self.wall.elapsed().as_secs_f64();
        let measured = match (&self.rapl_uj, rapl_read()) {
            (Some(a), Some(b)) if a.len() == b.len() => Some(
                a.iter()
                    .zip(&b)
                    .map(|((_, x, max), (_, y, _))| if y >= x { y - x } else { max - x + y })
                    .sum::<u64>() as f64
                    / 1e6,
            ),
            _ => None,
        };
        let (source, joules, w) = match measured {
            Some(j) => ("rapl", j, None),
            None => ("estimate", cpu * watts_per_core, Some(watts_per_core)),
        };
        let g = joules / 3.6e6 * grid_g_per_kwh;
        let per_k = |x: f64| {
            if tokens > 0 {
                x * 1000.0 / tokens as f64
            } else {
                0.0
            }
        };
        EnergyReport {
            source,
            joules,
            joules_per_1k_tokens: per_k(joules),
            tokens,
            cpu_seconds: cpu,
            wall_seconds: wall,
            watts_per_core: w,
            grid_g_co2e_per_kwh: grid_g_per_kwh,
            g_co2e: g,
            g_co2e_per_1k_tokens: per_k(g),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimate_is_cpu_time_times_power_and_labelled() {
        let m = EnergyMeter::start();
        // Burn CPU until the process clock (1/100 s ticks) has clearly moved; bounded in
        // wall time so a starved machine cannot hang the test.
        let mut x = 0u64;
        let (t, c0) = (std::time::Instant::now(), cpu_seconds());
        while cpu_seconds() - c0 < 0.05 && t.elapsed().as_secs() < 20 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        std::hint::black_box(x);
        let r = m.finish(1000, 10.0, 500.0);
        if r.source == "estimate" {
            assert!(r.cpu_seconds >= 0.05, "cpu {}", r.cpu_seconds);
            assert!((r.joules - r.cpu_seconds * 10.0).abs() < 1e-9);
            assert_eq!(r.watts_per_core, Some(10.0));
        }
        assert!((r.g_co2e - r.joules / 3.6e6 * 500.0).abs() < 1e-12);
        assert!((r.joules_per_1k_tokens - r.joules).abs() < 1e-9);
    }
}
