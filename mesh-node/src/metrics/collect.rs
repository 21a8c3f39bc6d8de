//! Values read at scrape time: the kernel programs' run counts and run time (`bpf_stats`,
//! enabled by the daemon), the kernel event counters, certificate expiry per identity, and the
//! process's CPU, memory, file descriptors and start time.

use std::path::PathBuf;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::ProgramInfo,
};
use mesh_common::Counter as KernelCounter;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::identity::CertManager;

/// The scrape-time collector.
#[derive(Debug)]
pub struct NodeCollector {
    /// The daemon's bpffs directory (program and map pins).
    pub bpffs: PathBuf,
    pub certs: CertManager,
}

impl NodeCollector {
    /// Run count and run time per program. Instances of one program (`sk_lookup` has one per
    /// enrolled netns, pinned as `<program>-<netns cookie>`) are summed.
    fn programs(&self) -> Vec<(String, u64, f64)> {
        let Ok(entries) = std::fs::read_dir(self.bpffs.join("progs")) else {
            return Vec::new();
        };
        let mut totals: std::collections::BTreeMap<String, (u64, f64)> =
            std::collections::BTreeMap::new();
        for entry in entries.filter_map(Result::ok) {
            let file = entry.file_name().to_string_lossy().into_owned();
            let name = file.split_once('-').map_or(file.as_str(), |(p, _)| p);
            if let Ok(info) = ProgramInfo::from_pin(entry.path()) {
                let total = totals.entry(name.to_owned()).or_default();
                total.0 += info.run_count();
                total.1 += info.run_time().as_secs_f64();
            }
        }
        totals
            .into_iter()
            .map(|(name, (runs, seconds))| (name, runs, seconds))
            .collect()
    }

    fn kernel_counters(&self) -> Vec<(&'static str, u64)> {
        let Ok(map) = MapData::from_pin(self.bpffs.join("maps").join(mesh_common::MAP_COUNTERS))
        else {
            return Vec::new();
        };
        let Ok(array) = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(map)) else {
            return Vec::new();
        };
        KernelCounter::ALL
            .iter()
            .filter_map(|c| {
                array
                    .get(&(*c as u32), 0)
                    .ok()
                    .map(|v| (c.name(), v.iter().sum::<u64>()))
            })
            .collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let programs = self.programs();
        {
            let mut m = encoder.encode_descriptor(
                "mesh_ebpf_program_runs",
                "Runs of each kernel program (bpf_stats)",
                None,
                MetricType::Counter,
            )?;
            for (name, runs, _) in &programs {
                let labels = ProgramLabels {
                    program: name.clone(),
                };
                ConstCounter::new(*runs).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "mesh_ebpf_program_run_seconds",
                "Time spent in each kernel program (bpf_stats)",
                None,
                MetricType::Counter,
            )?;
            for (name, _, seconds) in &programs {
                let labels = ProgramLabels {
                    program: name.clone(),
                };
                ConstCounter::new(*seconds).encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "mesh_ebpf_events",
                "Kernel program events: captures, bypasses, failures (summed over CPUs)",
                None,
                MetricType::Counter,
            )?;
            for (event, value) in self.kernel_counters() {
                ConstCounter::new(value).encode(m.encode_family(&EventLabels { event })?)?;
            }
        }
        {
            let mut m = encoder.encode_descriptor(
                "mesh_certificate_expiry_timestamp_seconds",
                "When the current certificate of each identity expires (Unix time)",
                None,
                MetricType::Gauge,
            )?;
            for state in self.certs.states() {
                if let Some(not_after) = state.not_after {
                    #[expect(clippy::cast_possible_wrap, reason = "Unix time fits i64")]
                    let value = not_after as i64;
                    ConstGauge::new(value).encode(m.encode_family(&IdentityLabels {
                        identity: state.identity,
                    })?)?;
                }
            }
        }
        encode_process(&mut encoder)
    }
}

/// `process_*` metrics from `/proc/self`.
fn encode_process(encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at index 2 (`state`).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |i: usize| {
        fields
            .get(i - 2)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let ticks = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    let page = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    #[expect(clippy::cast_precision_loss, reason = "metrics")]
    let cpu = (field(13) + field(14)) as f64 / ticks as f64;
    let rss = field(23) * page;
    let vsize = field(22);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("btime ")
                .and_then(|v| v.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    #[expect(clippy::cast_precision_loss, reason = "metrics")]
    let started_at = boot as f64 + field(21) as f64 / ticks as f64;

    let m = encoder.encode_descriptor(
        "process_cpu_seconds",
        "User and system CPU time",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(cpu).encode(m)?;
    let m = encoder.encode_descriptor(
        "process_resident_memory_bytes",
        "Resident memory",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(rss).unwrap_or(i64::MAX)).encode(m)?;
    let m = encoder.encode_descriptor(
        "process_virtual_memory_bytes",
        "Virtual memory",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(vsize).unwrap_or(i64::MAX)).encode(m)?;
    let m = encoder.encode_descriptor(
        "process_open_fds",
        "Open file descriptors",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::try_from(fds).unwrap_or(i64::MAX)).encode(m)?;
    let m = encoder.encode_descriptor(
        "process_start_time_seconds",
        "Start time (Unix)",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(started_at).encode(m)?;
    Ok(())
}
