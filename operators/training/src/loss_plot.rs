//! `loss.png`: the loss per step and its running mean, drawn with plotters.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

/// DejaVu Sans Mono (its licence is beside it in `operators/training/assets/`): a fresh machine may have
/// no fonts at all, and axis labels need one.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only on a corrupt font, which include_bytes! rules out.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws `(step, loss)` points and a moving average into a 800x480 PNG at `path`.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("loss.png");
/// latentflow_training::loss_plot::draw(&path, &[(1, 0.9), (2, 0.7), (3, 0.6)]).unwrap();
/// assert!(image::open(&path).is_ok());
/// ```
pub fn draw(path: &Path, points: &[(u64, f64)]) -> Result<(), String> {
    register_font();
    let (width, height) = (800u32, 480u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(&e))?;
        let first = points.first().map_or(0, |p| p.0);
        let last = points.last().map_or(1, |p| p.0).max(first + 1);
        let finite = points.iter().map(|p| p.1).filter(|v| v.is_finite());
        let (lo, hi) = finite.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
        let pad = ((hi - lo) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(64)
            .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))
            .map_err(|e| fail(&e))?;
        chart.configure_mesh().x_desc("step").y_desc("loss").draw().map_err(|e| fail(&e))?;
        let raw = RGBColor(150, 170, 220);
        chart.draw_series(LineSeries::new(points.iter().copied(), &raw)).map_err(|e| fail(&e))?;
        let window = (points.len() / 20).max(1);
        let smooth = points.iter().enumerate().map(|(i, &(step, _))| {
            let from = i.saturating_sub(window - 1);
            let slice = &points[from..=i];
            (step, slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64)
        });
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(format!("mean of {window}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE));
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE).draw().map_err(|e| fail(&e))?;
        root.present().map_err(|e| fail(&e))?;
    }
    image::save_buffer(path, &pixels, width, height, image::ExtendedColorType::Rgb8).map_err(|e| fail(&e))
}
