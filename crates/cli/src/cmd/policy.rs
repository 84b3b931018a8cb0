//! The stream policy options shared by `stream`, `pull` and `job`:
//! `--policy fixed|idle|host-pressure|adaptive` and its parameters, turned
//! into a [`stream::policy::Policy`] (local streams) or QMP arguments (jobs
//! of a daemon).

use clap::Args;
use serde_json::{Map, Value, json};
use stream::policy::{Policy, PolicyKind};

#[derive(Debug, Args, Default)]
pub struct PolicyArgs {
    /// How fast to copy: fixed (the --speed/--bandwidth token bucket), idle
    /// (only while the guest has had no request in flight for --grace-ms),
    /// host-pressure (back off under host I/O pressure, Linux PSI) or
    /// adaptive (keep guest latency near its idle baseline, never below
    /// --floor).
    #[arg(long, value_name = "POLICY", value_parser = PolicyKind::NAMES.to_vec())]
    pub policy: Option<String>,
    /// idle/adaptive: milliseconds without guest I/O that count as idle.
    #[arg(long, value_name = "MS", requires = "policy")]
    pub grace_ms: Option<u64>,
    /// host-pressure/adaptive: the rate kept whatever happens, bytes per
    /// second (suffixes K, M, G).
    #[arg(long, value_name = "RATE", value_parser = super::parse_size, requires = "policy")]
    pub floor: Option<u64>,
    /// adaptive: the guest latency target, percent of its idle baseline.
    #[arg(long, value_name = "PCT", requires = "policy")]
    pub latency_percent: Option<u64>,
    /// host-pressure/adaptive: the share of time other tasks may stall on
    /// I/O before the stream backs off, percent.
    #[arg(long, value_name = "PCT", requires = "policy")]
    pub pressure_percent: Option<u64>,
}

impl PolicyArgs {
    /// The policy for a local stream (`None`: the default, fixed).
    pub fn policy(&self) -> anyhow::Result<Option<Policy>> {
        let Some(name) = &self.policy else {
            return Ok(None);
        };
        let mut p = Policy::of(PolicyKind::parse(name).expect("checked by clap"));
        if let Some(g) = self.grace_ms {
            p.grace = std::time::Duration::from_millis(g);
        }
        if let Some(f) = self.floor {
            anyhow::ensure!(f > 0, "--floor must be positive: the stream must finish");
            p.floor = f;
        }
        if let Some(l) = self.latency_percent {
            anyhow::ensure!(l >= 100, "--latency-percent must be at least 100");
            p.latency_factor = l as f64 / 100.0;
        }
        if let Some(pr) = self.pressure_percent {
            anyhow::ensure!(
                (1..=100).contains(&pr),
                "--pressure-percent must be between 1 and 100"
            );
            p.pressure_threshold = pr as f64 / 100.0;
        }
        Ok(Some(p))
    }

    /// QMP arguments, each name after `prefix` (the daemon checks values).
    pub fn qmp_args(&self, prefix: &str) -> Map<String, Value> {
        let mut m = Map::new();
        let mut put = |k: &str, v: Value| {
            m.insert(format!("{prefix}{k}"), v);
        };
        if let Some(p) = &self.policy {
            put("policy", json!(p));
        }
        if let Some(v) = self.grace_ms {
            put("grace-ms", json!(v));
        }
        if let Some(v) = self.floor {
            put("floor", json!(v));
        }
        if let Some(v) = self.latency_percent {
            put("latency-percent", json!(v));
        }
        if let Some(v) = self.pressure_percent {
            put("pressure-percent", json!(v));
        }
        m
    }
}

/// One line on the policy from a `query-block-jobs` entry: the policy, copies
/// in flight and allowed, the allowed rate and why it holds back.
pub fn policy_line(j: &Value) -> Option<String> {
    let name = j["__com.diskstream_policy"].as_str()?;
    let rate = j["__com.diskstream_allowed-rate"].as_u64().unwrap_or(0);
    let rate = if rate == 0 {
        "unlimited".to_string()
    } else {
        format!("{rate} bytes/s")
    };
    Some(format!(
        "Policy: {name}  in flight {}/{}  allowed rate {rate}  held by: {}",
        j["__com.diskstream_in-flight"].as_u64().unwrap_or(0),
        j["__com.diskstream_allowed-in-flight"]
            .as_u64()
            .unwrap_or(0),
        j["__com.diskstream_held-by"].as_str().unwrap_or("?"),
    ))
}
