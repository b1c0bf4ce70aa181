// The conversation list and the settings: drawers behind the header's buttons at phone and
// tablet width (style.css shows both panels beside the conversation on a wide screen).

const $ = (id) => document.getElementById(id);

export function openPanel(name, focus) {
  const panel = $(name);
  panel.classList.add("open");
  $(`toggle-${name}`).setAttribute("aria-expanded", "true");
  (focus ?? panel.querySelector("button, input, select, textarea"))?.focus({ preventScroll: true });
}

export function closePanels() {
  for (const name of ["chats", "settings"]) {
    $(name).classList.remove("open");
    $(`toggle-${name}`).setAttribute("aria-expanded", "false");
  }
}

export function setupPanels() {
  for (const name of ["chats", "settings"]) {
    $(`toggle-${name}`).addEventListener("click", () => {
      const open = $(name).classList.contains("open");
      closePanels();
      if (!open) openPanel(name);
    });
  }
}
