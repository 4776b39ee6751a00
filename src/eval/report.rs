//! The evaluation report: `metrics.json` (everything measured), `metrics.md`
//! (the headline table and one row per prompt) and `index.html` (the images
//! next to their scores, self-contained).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::run::{EvalResult, LabeledImage};
use crate::util::{html_escape, png_data_uri, thumbnail, write_atomic};
use crate::{Error, Result};

fn opt(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// The headline table in markdown, the paper's columns.
pub fn headline_markdown(r: &EvalResult) -> String {
    let s = &r.scores;
    let mut m = String::from(
        "| | DINO | CLIP-I | CLIP-T | PRES | DIV | DIV (class prompt) |\n\
         |---|---|---|---|---|---|---|\n",
    );
    let _ = writeln!(
        m,
        "| real images ({}) | {} | {} | n/a | | | |",
        r.real.images,
        opt(r.real.dino),
        opt(r.real.clip_i)
    );
    let _ = writeln!(
        m,
        "| generated ({}) | {:.3} | {:.3} | {:.3} | {} | {} | {} |",
        r.images.len(),
        s.dino,
        s.clip_i,
        s.clip_t,
        opt(s.pres),
        opt(s.div),
        opt(s.div_class)
    );
    m
}

/// The whole markdown report.
pub fn markdown(r: &EvalResult, command: &str) -> String {
    let mut m = String::from("# DreamBooth evaluation\n\n");
    let _ = writeln!(m, "```sh\n{command}\n```\n");
    let _ = writeln!(
        m,
        "Real: `{}`; generated: `{}`{}; identifier `{}` removed from prompts for CLIP-T.\n",
        r.real_dir.display(),
        r.generated_dir.display(),
        r.class_dir
            .as_ref()
            .map(|d| format!("; class-prompt generations: `{}`", d.display()))
            .unwrap_or_default(),
        r.identifier
    );
    m.push_str(&headline_markdown(r));
    if let Some(n) = &r.div_note {
        let _ = writeln!(m, "\n{n}");
    }
    m.push_str(
        "\n## Per prompt\n\n| prompt | images | DINO | CLIP-I | CLIP-T | DIV |\n|---|---|---|---|---|---|\n",
    );
    for p in &r.prompts {
        let _ = writeln!(
            m,
            "| {} | {} | {:.3} | {:.3} | {:.3} | {} |",
            p.prompt.replace('|', "\\|"),
            p.images,
            p.dino,
            p.clip_i,
            p.clip_t,
            opt(p.div)
        );
    }
    m
}

/// The images the HTML page shows (thumbnails are made from these).
pub struct ReportImages<'a> {
    pub real: &'a [LabeledImage],
    pub generated: &'a [LabeledImage],
    pub class_generated: &'a [LabeledImage],
}

const THUMB: u32 = 160;

fn img_tag(im: &LabeledImage, title: &str) -> String {
    format!(
        "<img src=\"{}\" title=\"{}\">",
        png_data_uri(&thumbnail(&im.image, THUMB)),
        html_escape(title)
    )
}

/// The HTML page.
pub fn html(r: &EvalResult, images: &ReportImages, command: &str) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><title>dreambooth eval</title><style>\
         body{{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}}\
         img{{margin:2px;border:1px solid #ccc;max-height:{THUMB}px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ddd;padding:4px 8px;vertical-align:top}}\
         th{{background:#f4f4f4}} .num{{text-align:right}} figure{{display:inline-block;margin:4px;text-align:center}}\
         figcaption{{font-size:11px;color:#555}} code{{background:#f4f4f4}}</style></head><body>\
         <h1>DreamBooth evaluation</h1><p><code>{}</code></p>\
         <p>DINO / CLIP-I: mean cosine similarity of generated to real images (subject fidelity). \
         CLIP-T: image–prompt similarity with the identifier <code>{}</code> removed (prompt fidelity). \
         PRES: DINO of class-prompt generations to the real subject (lower is better: less language drift). \
         DIV: mean pairwise LPIPS among images of one prompt (higher is more diverse).</p>",
        html_escape(command),
        html_escape(&r.identifier)
    );
    let s = &r.scores;
    let _ = write!(
        h,
        "<table><tr><th></th><th>DINO</th><th>CLIP-I</th><th>CLIP-T</th><th>PRES</th><th>DIV</th>\
         <th>DIV (class prompt)</th></tr>\
         <tr><td>real images ({})</td><td class=num>{}</td><td class=num>{}</td><td>n/a</td><td></td><td></td><td></td></tr>\
         <tr><td>generated ({})</td><td class=num>{:.3}</td><td class=num>{:.3}</td><td class=num>{:.3}</td>\
         <td class=num>{}</td><td class=num>{}</td><td class=num>{}</td></tr></table>",
        r.real.images,
        opt(r.real.dino),
        opt(r.real.clip_i),
        r.images.len(),
        s.dino,
        s.clip_i,
        s.clip_t,
        opt(s.pres),
        opt(s.div),
        opt(s.div_class)
    );
    if let Some(n) = &r.div_note {
        let _ = write!(h, "<p><i>{}</i></p>", html_escape(n));
    }
    let _ = write!(h, "<h2>Real images</h2><p>");
    for im in images.real {
        let _ = write!(h, "{}", img_tag(im, &super::run::file_name(&im.path)));
    }
    h.push_str("</p><h2>Generated, per prompt</h2>");
    for p in &r.prompts {
        let _ = write!(
            h,
            "<h3>{}</h3><p>CLIP-T text: <code>{}</code> · DINO {:.3} · CLIP-I {:.3} · CLIP-T {:.3} · DIV {}</p><div>",
            html_escape(&p.prompt),
            html_escape(&p.clip_t_text),
            p.dino,
            p.clip_i,
            p.clip_t,
            opt(p.div)
        );
        for (im, sc) in images.generated.iter().zip(&r.images) {
            if sc.prompt != p.prompt {
                continue;
            }
            let _ = write!(
                h,
                "<figure>{}<figcaption>{}<br>DINO {:.3} · CLIP-I {:.3} · CLIP-T {:.3}</figcaption></figure>",
                img_tag(im, &sc.file),
                html_escape(&sc.file),
                sc.dino,
                sc.clip_i,
                sc.clip_t
            );
        }
        h.push_str("</div>");
    }
    if !r.class_images.is_empty() {
        let _ = write!(
            h,
            "<h2>Class-prompt generations (PRES {})</h2><div>",
            opt(s.pres)
        );
        for (im, sc) in images.class_generated.iter().zip(&r.class_images) {
            let _ = write!(
                h,
                "<figure>{}<figcaption>{}<br>PRES {:.3}</figcaption></figure>",
                img_tag(im, &sc.file),
                html_escape(&sc.file),
                sc.pres
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</body></html>");
    h
}

/// The files [`write_report`] wrote.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    pub json: PathBuf,
    pub markdown: PathBuf,
    pub html: PathBuf,
}

/// Writes `metrics.json`, `metrics.md` and `index.html` into `out`.
pub fn write_report(
    out: &Path,
    r: &EvalResult,
    images: &ReportImages,
    command: &str,
) -> Result<ReportFiles> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let files = ReportFiles {
        json: out.join("metrics.json"),
        markdown: out.join("metrics.md"),
        html: out.join("index.html"),
    };
    let json = serde_json::to_string_pretty(&serde_json::json!({
        "command": command,
        "result": r,
    }))
    .map_err(|e| Error::msg(format!("serializing the evaluation: {e}")))?;
    write_atomic(&files.json, json.as_bytes())?;
    write_atomic(&files.markdown, markdown(r, command).as_bytes())?;
    write_atomic(&files.html, html(r, images, command).as_bytes())?;
    Ok(files)
}
