//! JSON and text forms of [`ObjectsReport`] (`pagescope objects`).

use std::io::{self, Write};

use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

use super::view::{ObjectReport, ObjectsReport, Sharer, SharerMapping};
use crate::page::PageState;
use crate::render::SizeUnit;

impl ObjectsReport {
    /// The `objects --json` document; `ranges` adds every object's runs.
    pub fn json(&self, ranges: bool) -> impl Serialize + '_ {
        Doc { r: self, ranges }
    }

    /// Writes the `pagescope objects` listing, sizes in `unit`.
    pub fn write_text(&self, unit: SizeUnit, w: &mut dyn Write) -> io::Result<()> {
        let kb = |p: u64| unit.format(p * self.page_size.get());
        writeln!(w, "shared objects: sizes in {}", unit.name())?;
        for o in &self.objects {
            writeln!(
                w,
                "{} {} inode {} ({}), size {}: {}",
                o.kind_name(),
                o.id.dev,
                o.id.inode,
                o.path,
                kb(o.size_pages),
                o.state_summary(kb)
            )?;
            if let Some(e) = &o.error {
                writeln!(w, "    cannot classify: {e}")?;
            }
            for s in &o.sharers {
                for m in &s.mappings {
                    writeln!(
                        w,
                        "    pid {:>7} {:<16} {} {} pages {}..{} ({} present)",
                        s.pid,
                        s.comm,
                        m.range,
                        m.perms,
                        m.first_page,
                        m.first_page + m.pages,
                        kb(m.present_pages)
                    )?;
                }
            }
        }
        for s in &self.skipped {
            writeln!(w, "skipped process {}: {}", s.pid, s.reason)?;
        }
        Ok(())
    }
}

impl ObjectReport {
    fn kind_name(&self) -> String {
        serde_json::to_value(self.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    fn state_summary(&self, kb: impl Fn(u64) -> String) -> String {
        let mut parts: Vec<String> = PageState::ALL
            .iter()
            .filter(|&&s| self.counts.get(s) > 0)
            .map(|&s| format!("{} {}", s, kb(self.counts.get(s))))
            .collect();
        parts.push(format!("mapped {}", kb(self.mapped_pages)));
        parts.join(", ")
    }
}

struct Doc<'a> {
    r: &'a ObjectsReport,
    ranges: bool,
}

impl Serialize for Doc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("objects", 5)?;
        st.serialize_field("page_size", &self.r.page_size.get())?;
        st.serialize_field("privileged", &self.r.privileged)?;
        st.serialize_field("complete", &self.r.complete())?;
        let objects: Vec<_> = self
            .r
            .objects
            .iter()
            .map(|o| ObjectDoc {
                o,
                ranges: self.ranges,
            })
            .collect();
        st.serialize_field("objects", &objects)?;
        let skipped: Vec<_> = self
            .r
            .skipped
            .iter()
            .map(|s| serde_json::json!({"pid": s.pid, "reason": s.reason}))
            .collect();
        st.serialize_field("skipped", &skipped)?;
        st.end()
    }
}

struct ObjectDoc<'a> {
    o: &'a ObjectReport,
    ranges: bool,
}

impl Serialize for ObjectDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = self.o;
        let mut st = s.serialize_struct("object", 11)?;
        st.serialize_field("dev", &o.id.dev.to_string())?;
        st.serialize_field("inode", &o.id.inode)?;
        st.serialize_field("backing", &o.backing)?;
        st.serialize_field("kind", &o.kind)?;
        st.serialize_field("path", &o.path)?;
        st.serialize_field("size_pages", &o.size_pages)?;
        st.serialize_field("counts", &o.counts)?;
        st.serialize_field("mapped_pages", &o.mapped_pages)?;
        if let Some(e) = &o.error {
            st.serialize_field("object_error", e)?;
        }
        let sharers: Vec<_> = o.sharers.iter().map(SharerDoc).collect();
        st.serialize_field("sharers", &sharers)?;
        if self.ranges {
            let runs: Vec<_> = o
                .runs
                .iter()
                .map(|r| serde_json::json!({"first": r.first, "count": r.count, "state": PageState::from(r.state)}))
                .collect();
            st.serialize_field("ranges", &runs)?;
        }
        st.end()
    }
}

struct SharerDoc<'a>(&'a Sharer);

impl Serialize for SharerDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("sharer", 3)?;
        st.serialize_field("pid", &self.0.pid)?;
        st.serialize_field("comm", &self.0.comm)?;
        let m: Vec<_> = self.0.mappings.iter().map(MappingDoc).collect();
        st.serialize_field("mappings", &m)?;
        st.end()
    }
}

struct MappingDoc<'a>(&'a SharerMapping);

impl Serialize for MappingDoc<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let m = self.0;
        let mut st = s.serialize_struct("mapping", 6)?;
        st.serialize_field("start", &m.range.start())?;
        st.serialize_field("end", &m.range.end())?;
        st.serialize_field("perms", &m.perms.to_string())?;
        st.serialize_field("first_page", &m.first_page)?;
        st.serialize_field("pages", &m.pages)?;
        st.serialize_field("present_pages", &m.present_pages)?;
        st.end()
    }
}
