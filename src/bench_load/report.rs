//! What `bench load` prints and draws: a row of the table a rate, and the SVG of latency against
//! offered load, one line a kind of request (and feature setting compared).
use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

/// `FEATURE on|off` of a compared row, else empty.
fn variant(r: &Value) -> String {
    match (r["feature"].as_str(), r["feature_on"].as_bool()) {
        (Some(f), Some(on)) => format!("{f} {}", if on { "on" } else { "off" }),
        _ => String::new(),
    }
}

/// One rate's row of the table: throughput, errors and refusals, latency percentiles, the
/// client's time to first token and the server's stages (p50/p99).
pub(super) fn print_row(r: &Value) {
    let l = &r["latency_ms"];
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let mut stages: Vec<String> = r["server_stages_ms"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k} {}/{}", f(&v["p50"]), f(&v["p99"])))
                .collect()
        })
        .unwrap_or_default();
    let ttft = &r["client_first_token_ms"];
    if !ttft.is_null() {
        stages.insert(
            0,
            format!("client TTFT {}/{}", f(&ttft["p50"]), f(&ttft["p99"])),
        );
    }
    let variant = variant(r);
    let offered = match r["closed_clients"].as_u64() {
        Some(c) => format!("{c} cl"),
        None => format!("{:.2}", r["offered_rps"].as_f64().unwrap_or(0.0)),
    };
    println!(
        "{:<8} {:<9} {:>7} {:>6} {:>6} {:>6} {:>7} {:>8.2} {:>8} {:>8} {:>8} {:>5} {:>6}  {}",
        r["kind"].as_str().unwrap_or(""),
        variant,
        offered,
        r["sent"].as_u64().unwrap_or(0),
        r["ok"].as_u64().unwrap_or(0),
        r["errors"].as_u64().unwrap_or(0),
        r["refused_429"].as_u64().unwrap_or(0),
        r["throughput_rps"].as_f64().unwrap_or(0.0),
        f(&l["p50"]),
        f(&l["p95"]),
        f(&l["p99"]),
        r["cache_hits"].as_u64().unwrap_or(0),
        r["hedged"].as_u64().unwrap_or(0),
        stages.join(", ")
    );
}

/// Latency percentiles against offered load, one panel per kind.
pub(super) fn plot(rows: &[Value], path: &std::path::Path) -> Result<()> {
    // one panel per kind and compared variant; closed-loop rows have no offered load to plot
    let rows: Vec<&Value> = rows
        .iter()
        .filter(|r| r["offered_rps"].is_number())
        .collect();
    let mut kinds: Vec<(String, String)> = Vec::new();
    for r in &rows {
        let k = (r["kind"].as_str().unwrap_or("").to_string(), variant(r));
        if !kinds.contains(&k) {
            kinds.push(k);
        }
    }
    if kinds.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (520 * kinds.len() as u32, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, kinds.len()));
    for (panel, (kind, var)) in panels.iter().zip(&kinds) {
        let rs: Vec<&Value> = rows
            .iter()
            .copied()
            .filter(|r| r["kind"] == kind.as_str() && variant(r) == *var)
            .collect();
        let kind = if var.is_empty() {
            kind.clone()
        } else {
            format!("{kind} ({var})")
        };
        let x_max = rs
            .iter()
            .filter_map(|r| r["offered_rps"].as_f64())
            .fold(0.0, f64::max)
            * 1.1;
        let y_max = rs
            .iter()
            .filter_map(|r| r["latency_ms"]["p99"].as_f64())
            .fold(1.0, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!("{kind}: latency against offered load"),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max.max(0.1), 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("offered load (requests/s)")
            .y_desc("latency (ms)")
            .draw()?;
        for (p, color) in [("p50", &BLUE), ("p95", &GREEN), ("p99", &RED)] {
            let pts: Vec<(f64, f64)> = rs
                .iter()
                .filter_map(|r| Some((r["offered_rps"].as_f64()?, r["latency_ms"][p].as_f64()?)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(p)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart.draw_series(
                pts.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )?;
        }
        let tp: Vec<(f64, f64)> = rs
            .iter()
            .filter_map(|r| {
                let offered = r["offered_rps"].as_f64()?;
                let done = r["throughput_rps"].as_f64()?;
                // throughput as a share of the offered rate, drawn on the latency scale's top
                Some((offered, y_max * (done / offered).min(1.0) * 0.95))
            })
            .collect();
        chart
            .draw_series(LineSeries::new(tp, BLACK.mix(0.4)))?
            .label("throughput / offered (top = 1)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.4)));
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
