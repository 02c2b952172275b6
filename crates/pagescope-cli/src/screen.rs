//! The full-screen terminal session behind `watch`'s live view, on
//! `ratatui` and `crossterm`: the alternate screen with the cursor hidden,
//! raw mode on a terminal stdin so single keys arrive (`q`, Ctrl-C), frames
//! fitted to stdout's terminal and redrawn from scratch when it is
//! resized, and the terminal restored when the session is dropped (so on
//! every way out: the end, an error, the target's exit) or, on a panic,
//! before the panic message is printed.
//!
//! Each frame is one synchronized update (`CSI ? 2026 h` ... `l`), so
//! terminals that support it never show half a frame.

use std::io::{self, IsTerminal, Stdout};
use std::os::fd::AsFd;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{
    BeginSynchronizedUpdate, EndSynchronizedUpdate, EnterAlternateScreen, LeaveAlternateScreen,
    disable_raw_mode, enable_raw_mode,
};
use crossterm::{cursor, execute, queue};
use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Frame, Terminal, TerminalOptions, Viewport};

/// The size assumed when the terminal does not report one.
const UNKNOWN_SIZE: (u16, u16) = (120, 40);

/// Whether a session holds the terminal (what [`restore`] undoes).
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// A full-screen session on stdout's terminal.
pub struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
    /// The area frames are drawn in (see [`frame_area`]).
    area: Rect,
    /// Whether stdin is a terminal in raw mode (keys are read).
    keys: bool,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen")
            .field("area", &self.area)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Screen {
    /// Switches stdout's terminal to the alternate screen (and a terminal
    /// stdin to raw mode).
    pub fn enter() -> io::Result<Self> {
        let area = frame_area();
        let backend = CrosstermBackend::new(io::stdout());
        let terminal = Terminal::with_options(
            backend,
            TerminalOptions {
                viewport: Viewport::Fixed(area),
            },
        )?;
        restore_on_panic();
        let keys = io::stdin().is_terminal() && enable_raw_mode().is_ok();
        // From here on, dropping the session restores the terminal.
        ACTIVE.store(true, Ordering::SeqCst);
        let mut screen = Self {
            terminal,
            area,
            keys,
        };
        execute!(
            screen.terminal.backend_mut(),
            EnterAlternateScreen,
            cursor::Hide
        )?;
        screen.terminal.clear()?;
        Ok(screen)
    }

    /// Whether the terminal's size changed since the last frame.
    pub fn resized(&self) -> bool {
        frame_area() != self.area
    }

    /// Draws one frame with `render`, fitted to the terminal's current
    /// size (after a resize the screen is cleared and drawn in full).
    pub fn draw(&mut self, render: impl FnOnce(&mut Frame<'_>)) -> io::Result<()> {
        queue!(self.terminal.backend_mut(), BeginSynchronizedUpdate)?;
        let now = frame_area();
        if now != self.area {
            self.area = now;
            self.terminal.resize(now)?;
        }
        self.terminal.draw(render)?;
        execute!(self.terminal.backend_mut(), EndSynchronizedUpdate)
    }

    /// Whether `q` or Ctrl-C was typed since the last call (never when
    /// stdin is not a terminal: then Ctrl-C is SIGINT, handled by
    /// [`crate::signals`]).
    pub fn quit_pressed(&mut self) -> io::Result<bool> {
        if !self.keys {
            return Ok(false);
        }
        let mut quit = false;
        while event::poll(Duration::ZERO)? {
            if let Event::Key(key) = event::read()? {
                quit |= key.kind == KeyEventKind::Press && is_quit(key.code, key.modifiers);
            }
        }
        Ok(quit)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Leaves the alternate screen and raw mode, once per session.
fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
        // A no-op unless raw mode was entered.
        let _ = disable_raw_mode();
    }
}

/// Makes a panic restore the terminal before its message is printed
/// (else the message lands on the alternate screen and vanishes with it).
fn restore_on_panic() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let print = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            print(info);
        }));
    });
}

fn is_quit(code: KeyCode, modifiers: KeyModifiers) -> bool {
    match code {
        KeyCode::Char('q' | 'Q') => true,
        KeyCode::Char('c') => modifiers.contains(KeyModifiers::CONTROL),
        _ => false,
    }
}

/// Where frames go: stdout's terminal less its last column and row (the
/// view has always left them free), or [`UNKNOWN_SIZE`] if the terminal
/// does not report its size. Measured on stdout, the stream drawn on
/// (crossterm measures the controlling terminal, which may be another).
fn frame_area() -> Rect {
    let (cols, rows) = rustix::termios::tcgetwinsize(io::stdout().as_fd())
        .ok()
        .filter(|w| w.ws_col > 0 && w.ws_row > 0)
        .map_or(UNKNOWN_SIZE, |w| (w.ws_col, w.ws_row));
    Rect::new(0, 0, cols.saturating_sub(1), rows.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_and_ctrl_c_quit() {
        assert!(is_quit(KeyCode::Char('q'), KeyModifiers::NONE));
        assert!(is_quit(KeyCode::Char('c'), KeyModifiers::CONTROL));
        assert!(!is_quit(KeyCode::Char('c'), KeyModifiers::NONE));
        assert!(!is_quit(KeyCode::Esc, KeyModifiers::NONE));
    }
}
