//! The demo's PNG: training loss per epoch, and test accuracy per epoch in inference mode
//! versus training mode.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

/// DejaVu Sans Mono (see assets/DejaVu-LICENSE.txt), embedded so text renders on machines
/// without fonts.
const FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

fn series(epochs: &[Value], key: &str) -> Vec<(f64, f64)> {
    epochs
        .iter()
        .filter_map(|e| Some((e["epoch"].as_f64()?, e[key].as_f64()?)))
        .collect()
}

/// Draws the plot into `path` (through a temporary file and a rename).
pub fn write(path: &Path, epochs: &[Value]) -> Result<()> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow!("embedded font is invalid"))?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = dir.join(format!(".bnorm-plot-{}.png", std::process::id()));
    draw(&tmp, epochs).map_err(|e| anyhow!("drawing the plot: {e}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw(path: &Path, epochs: &[Value]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (1100, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(540);
    let n = epochs.len().max(2) as f64;

    let loss = series(epochs, "loss");
    let max_loss = loss.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&left)
        .caption("training loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1.0..n, 0.0..max_loss)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("cross-entropy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    chart
        .draw_series(LineSeries::new(loss.clone(), BLUE.stroke_width(2)))?
        .label("loss (training batches)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(loss.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;

    let inf = series(epochs, "test_accuracy_inference");
    let trn = series(epochs, "test_accuracy_train_mode");
    let lo = inf.iter().chain(&trn).map(|p| p.1).fold(1.0f64, f64::min);
    let lo = (lo - 0.05).clamp(0.0, 0.9);
    let mut chart = ChartBuilder::on(&right)
        .caption("test accuracy", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(1.0..n, lo..1.0)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let green = RGBColor(0, 150, 60);
    chart
        .draw_series(LineSeries::new(inf.clone(), green.stroke_width(2)))?
        .label("inference mode (running statistics)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green.stroke_width(2)));
    chart.draw_series(inf.iter().map(|&p| Circle::new(p, 3, green.filled())))?;
    chart
        .draw_series(LineSeries::new(trn.clone(), RED.stroke_width(2)))?
        .label("training mode (batch statistics)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart.draw_series(trn.iter().map(|&p| Circle::new(p, 3, RED.filled())))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
